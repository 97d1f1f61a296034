"""Latency statistics, SLO attainment and the fluidity index, from the load generator's records.

Definitions (times are the client's):
- TTFT: send to first chunk with text. TPOT: (e2e - TTFT) / (output tokens - 1), a request's
  mean decode pace. ITL: every gap between consecutive chunks with text, pooled over requests.
  E2E: send to end of stream.
- Percentiles interpolate linearly between order statistics (numpy's default).
- SLO attainment: the fraction of all requests sent that met both the TTFT and the TPOT SLO; a
  failed request misses, a one-token answer has no TPOT and is judged on TTFT alone.
- Fluidity index (after Etalon, Agrawal et al. 2024): TTFT and TPOT averages hide stalls that
  a reader sees, so each token gets a deadline. The first token's is the TTFT SLO; each next
  deadline is one TPOT SLO after the previous deadline while tokens are on time, so a token
  that comes early banks the slack for later ones. When a token misses its deadline, the
  schedule restarts from that token's arrival (the next deadline is one TPOT SLO after it),
  so one stall costs the tokens it delayed and is not charged again to every token after it.
  The index is the fraction of deadlines met over all tokens of all requests (a failed
  request misses every token it asked for). A chunk carrying several tokens counts as one.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from punctual.bench.loadgen import LoadResult, RequestRecord

# DistServe's goodput counts a rate as served when 90% of its requests meet their SLOs.
DEFAULT_ATTAINMENT_TARGET = 0.9


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: an SLO must be positive, got {getattr(self, name)}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between the nearest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    return _ranked(sorted(values), q)


def _ranked(ordered: list[float], q: float) -> float:
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution_ms(values_s: list[float]) -> dict | None:
    """Mean, median, p90 and p99 in milliseconds; None for no values."""
    if not values_s:
        return None
    ms = [v * 1000 for v in values_s]
    mean = sum(ms) / len(ms)  # summed in the given order, before the sort
    ms.sort()  # once for the three ranks: a simulated 100k-request run has tens of millions of gaps
    return {"mean": mean, "median": _ranked(ms, 50), "p90": _ranked(ms, 90), "p99": _ranked(ms, 99),
            "count": len(ms)}


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    if not record.ok or record.ttft_s is None or record.ttft_s > slo.ttft_s:
        return False
    tpot = record.tpot_s
    return tpot is None or tpot <= slo.tpot_s


def slo_attainment(records: list[RequestRecord], slo: SLO) -> float:
    if not records:
        raise ValueError("SLO attainment of no requests")
    return sum(meets_slo(r, slo) for r in records) / len(records)


def token_deadlines_met(token_times_s: list[float], slo: SLO) -> int:
    """How many tokens, arriving at `token_times_s` after the send, met their deadlines."""
    met, deadline = 0, slo.ttft_s
    for arrival in token_times_s:
        if arrival <= deadline:
            met += 1
            deadline += slo.tpot_s            # on time: keep the schedule, and any slack
        else:
            deadline = arrival + slo.tpot_s   # late: restart the schedule from this token
    return met


def fluidity_index(records: list[RequestRecord], slo: SLO) -> float:
    met = total = 0
    for record in records:
        if record.ok:
            met += token_deadlines_met(record.token_times_s, slo)
            total += len(record.token_times_s)
        else:
            total += record.output_len
    if total == 0:
        raise ValueError("fluidity index of no tokens")
    return met / total


def summarize(result: LoadResult, slo: SLO | None = None) -> dict:
    """Everything a table, a plot or a goodput search needs from one run."""
    records = result.records
    done = [r for r in records if r.ok]
    duration = result.duration_s
    out_tokens = sum(r.output_tokens for r in done)
    summary = {
        "requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "mean_prompt_tokens": _mean([r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done]),
        "mean_output_tokens": _mean([r.output_tokens for r in done]),
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done if r.e2e_s is not None]),
        # A client that cannot keep its schedule (an overloaded load generator) shows here.
        "send_lag_ms": distribution_ms([max(0.0, r.sent_s - r.scheduled_s) for r in records]),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }
    if slo is not None:
        good = sum(meets_slo(r, slo) for r in records)
        summary["slo"] = {"ttft_ms": slo.ttft_s * 1000, "tpot_ms": slo.tpot_s * 1000,
                          "attainment": good / len(records) if records else 0.0,
                          "fluidity_index": fluidity_index(records, slo) if records else 0.0,
                          "good_request_throughput": good / duration if duration > 0 else 0.0}
    if any(r.user for r in records):
        summary["per_user"] = per_user(records, duration, slo)
    return summary


def per_user(records: list[RequestRecord], duration_s: float, slo: SLO | None) -> dict:
    """Service each tenant got: for fairness, compare these across users."""
    by_user: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        by_user[record.user or "-"].append(record)
    table = {}
    for user, group in sorted(by_user.items()):
        done = [r for r in group if r.ok]
        row = {"requests": len(group), "completed": len(done),
               "output_throughput": sum(r.output_tokens for r in done) / duration_s if duration_s > 0 else 0.0,
               "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
               "tpot_ms": distribution_ms([r.tpot_s for r in done if r.tpot_s is not None])}
        if slo is not None:
            row["attainment"] = slo_attainment(group, slo)
        table[user] = row
    return table


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
