"""Terminal tables and the JSON file of a benchmark's results."""
from __future__ import annotations

import json
import math
from pathlib import Path

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def latency_table(summary: dict) -> str:
    """One run: latency percentiles, then throughput and SLO lines."""
    rows = []
    for label, key in LATENCIES:
        stats = summary.get(key) or {}
        rows.append([f"{label} (ms)"] + [_ms(stats.get(c)) for c in ("mean", "median", "p90", "p99")])
    lines = [table(["metric", "mean", "median", "p90", "p99"], rows),
             f"requests: {summary['completed']}/{summary['requests']} completed in {summary['duration_s']:.1f} s; "
             f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s"]
    if "slo" in summary:
        slo = summary["slo"]
        lines.append(f"SLO (TTFT {slo['ttft_ms']:g} ms, TPOT {slo['tpot_ms']:g} ms): attainment "
                     f"{slo['attainment']:.1%}, fluidity index {slo['fluidity_index']:.1%}")
    if summary.get("errors"):
        lines.append("errors: " + "; ".join(summary["errors"]))
    return "\n".join(lines)


def per_user_table(summary: dict) -> str:
    """Service per tenant (multi-tenant runs), for fairness."""
    rows = []
    for user, row in summary["per_user"].items():
        ttft = row["ttft_ms"] or {}
        rows.append([user, f"{row['completed']}/{row['requests']}", f"{row['output_throughput']:.1f}",
                     _ms(ttft.get("median")), _ms(ttft.get("p90")),
                     f"{row['attainment']:.0%}" if "attainment" in row else "-"])
    return table(["user", "ok", "tok/s", "TTFT p50", "TTFT p90", "SLO"], rows)


def sweep_table(runs: list[dict]) -> str:
    """Many runs, one row each."""
    rows = []
    for run in runs:
        s = run["summary"]
        ttft, tpot = s["ttft_ms"] or {}, s["tpot_ms"] or {}
        if run.get("rate") is not None:
            load = "inf" if math.isinf(run["rate"]) else f"{run['rate']:g}/s"
        else:
            load = f"c={run['concurrency']}" if run.get("concurrency") else "trace"
        slo = s.get("slo")
        rows.append([run["system"], run["workload"], load, f"{s['completed']}/{s['requests']}",
                     f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                     _ms(ttft.get("median")), _ms(ttft.get("p99")), _ms(tpot.get("median")), _ms(tpot.get("p99")),
                     f"{slo['attainment']:.0%}" if slo else "-", f"{slo['fluidity_index']:.0%}" if slo else "-"])
    return table(["system", "workload", "load", "ok", "req/s", "tok/s", "TTFT p50", "TTFT p99",
                  "TPOT p50", "TPOT p99", "SLO", "fluid"], rows)


def goodput_table(goodputs: dict) -> str:
    """Goodput per system and workload, from sweep.goodputs."""
    workloads = sorted({w for per_system in goodputs.values() for w in per_system})
    rows = [[system] + [_goodput(per_system.get(w)) for w in workloads] for system, per_system in goodputs.items()]
    return table(["goodput (req/s)"] + workloads, rows)


def _goodput(entry: dict | None) -> str:
    if entry is None:
        return "-"
    rate, rates = entry["goodput"], entry["rates"]
    if rate is None:
        return f"< {min(rates):g}"
    return f">= {rate:g}" if rate == max(rates) else f"{rate:g}"  # every rate passed: a lower bound


def write_json(path: str | Path, payload: dict) -> None:
    # json writes infinity as Infinity, which strict readers reject: a burst rate becomes "inf".
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_finite(payload), indent=1))


def _finite(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
