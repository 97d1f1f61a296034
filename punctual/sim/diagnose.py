"""Where a request's TPOT goes, on a real server and in the simulator, step by step.

A TPOT that the simulator gets wrong at every rate is wrong in one of a few ways that noise does
not explain, and each shows in the steps a decoding request goes through (between the step of
its first token and the step of its last):
  steps per token   more than 1: it waited out steps it had no part in (preemption, a scheduler
                    that skips it); the same scheduler on the same requests should agree
  mixed share       of those steps, the ones that also ran prompt chunks of other requests: they
                    cost more than a decode-only step; a different share means different arrivals
                    or chunking
  step time by kind what a decode-only and a mixed step took, against what the profile prices
                    them at (the calibration's residual by kind, not only by batch size)
  engine TPOT       (end of its last token's step - end of its first's) / (tokens - 1)
  client TPOT       what the bench reports: (e2e - TTFT) / (output tokens - 1); minus the engine
                    TPOT, the front end's share (detokenizing, SSE, the first text chunk)

The server's side comes from its step trace (`punctual.engine.trace`, with the requests that
sampled in each step), the simulator's from `record_steps` on its replicas. Pure Python.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class StepRecord:
    """One step as a request sees it: when it ran, its plan's features, who sampled in it."""

    start: float
    end: float
    features: tuple[float, ...]
    sampled: tuple[str, ...]

    @property
    def mixed(self) -> bool:
        """It ran prompt tokens (a chunk of another request's prompt, or a recomputation)."""
        return self.features[1] > 0


def trace_steps(trace) -> list[StepRecord]:
    """A server trace's steps (`sim.trace.ServerTrace`); each lasts its serving-loop period."""
    if any(ids is None for ids in trace.sampled):
        raise ValueError("this step trace does not say which requests sampled in each step "
                         "(written by an older core): trace the server again")
    return [StepRecord(planned, planned + seconds, tuple(features), tuple(ids))
            for planned, seconds, features, ids in zip(trace.planned, trace.seconds, trace.rows, trace.sampled)]


def record_steps(simulator) -> list[StepRecord]:
    """Record every step the simulator's replicas finish, in the order they finish (one replica:
    its order). Runs of repeated decode steps are not seen: build the simulator with
    `SimConfig.repeat_decode_steps=False` (the same answers, every step planned)."""
    from punctual.sim.profile import plan_features

    if simulator.config.repeat_decode_steps:
        raise ValueError("record_steps: a simulator that prices runs of repeated steps at once "
                         "(SimConfig.repeat_decode_steps) does not finish them one by one")
    log: list[StepRecord] = []
    for replica in simulator.replicas:
        finish = replica.finish_step

        def finish_step(now, replica=replica, finish=finish):
            plan = replica.plan
            log.append(StepRecord(replica.step_started, now, plan_features(plan),
                                  tuple(item.request_id for item in plan.scheduled if item.samples)))
            return finish(now)
        replica.finish_step = finish_step
    return log


def token_steps(steps: list[StepRecord]) -> dict[str, list[int]]:
    """Request id -> the indices of the steps in which it sampled a token, in order."""
    out: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for request_id in step.sampled:
            out.setdefault(request_id, []).append(i)
    return out


def decode_breakdown(steps: list[StepRecord], request_ids: Iterable[str],
                     predict: Callable[[tuple[float, ...]], float] | None = None) -> dict | None:
    """The decode phase of `request_ids` (those with two tokens or more) in `steps`: means over
    the requests (steps_per_token, engine_tpot_ms, tokens) and over every step of every
    request's window, pooled as the requests live through them (mixed_share, decode_step_ms,
    mixed_step_ms, rows; with `predict`, the profile's price of the same steps beside them).
    None when no request decoded."""
    where = token_steps(steps)
    per_token, tpots, tokens = [], [], []
    kinds = {False: [], True: []}  # mixed -> (measured seconds, predicted seconds) of window steps
    rows = []
    for request_id in request_ids:
        indices = where.get(request_id)
        if not indices or len(indices) < 2:
            continue
        first, last = indices[0], indices[-1]
        n = len(indices)
        tokens.append(n)
        per_token.append((last - first) / (n - 1))
        tpots.append((steps[last].end - steps[first].end) / (n - 1))
        for step in steps[first + 1:last + 1]:
            kinds[step.mixed].append((step.end - step.start, predict(step.features) if predict else None))
            rows.append(step.features[5])
    if not tokens:
        return None
    window = len(kinds[False]) + len(kinds[True])
    out = {"num_requests": len(tokens), "tokens": statistics.fmean(tokens),
           "steps_per_token": statistics.fmean(per_token), "mixed_share": len(kinds[True]) / window,
           "rows": statistics.fmean(rows), "engine_tpot_ms": statistics.fmean(tpots) * 1000}
    for mixed, name in ((False, "decode"), (True, "mixed")):
        pairs = kinds[mixed]
        out[f"{name}_step_ms"] = statistics.fmean(s for s, _ in pairs) * 1000 if pairs else None
        out[f"{name}_predicted_ms"] = (statistics.fmean(p for _, p in pairs) * 1000
                                       if pairs and predict is not None else None)
    return out


def client_tpots(records: list[dict]) -> dict | None:
    """The bench's TPOT of the records, mean and median, and the same by the chunks' own times
    ((last chunk - first chunk) / (chunks - 1)): the two differ when a stream's first or last
    text comes late (a first token that decodes to no text) or chunks carry several tokens."""
    bench = [r["tpot_s"] for r in records if r.get("tpot_s") is not None]
    chunks = [(r["token_times_s"][-1] - r["token_times_s"][0]) / (len(r["token_times_s"]) - 1)
              for r in records if r.get("tpot_s") is not None and len(r.get("token_times_s") or ()) > 1]
    if not bench:
        return None
    short = sum(1 for r in records if r.get("tpot_s") is not None
                and len(r.get("token_times_s") or ()) < r.get("output_tokens", 0))
    return {"tpot_ms": statistics.fmean(bench) * 1000, "tpot_p50_ms": statistics.median(bench) * 1000,
            "chunk_tpot_ms": statistics.fmean(chunks) * 1000 if chunks else None,
            "fewer_chunks_than_tokens": short / len(bench)}


STREAM_BUCKETS = (("1", 1, 1), ("2-3", 2, 3), ("4-7", 4, 7), ("8-15", 8, 15), ("16+", 16, 1 << 30))


def concurrent_streams(records: list[dict]) -> dict[int, int]:
    """Record index -> how many of the records were decoding (between their first token and
    their end) at the middle of its own decode phase, itself included: the batch it decoded in,
    as the client saw it."""
    spans = {r["index"]: (r["sent_s"] + r["ttft_s"], r["sent_s"] + r["e2e_s"]) for r in records
             if r.get("ttft_s") is not None and r.get("e2e_s") is not None}
    out = {}
    for index, (start, end) in spans.items():
        middle = (start + end) / 2
        out[index] = sum(1 for a, b in spans.values() if a <= middle <= b)
    return out


def tpot_ratio_by_streams(real_records: list[dict], sim_records: list[dict],
                          streams: dict | None = None) -> dict[str, dict]:
    """The simulator's TPOT over the server's, request by request (same index), by the streams
    the request decoded beside on the server (`concurrent_streams`, or `streams` given by index):
    {bucket: {"num_requests", "median_ratio"}}. A ratio that falls as streams grow is a
    per-stream cost the profile lacks; one level at every bucket, the machine's speed (or the
    fixed cost)."""
    sim = {r["index"]: r["tpot_s"] for r in sim_records if r.get("tpot_s")}
    real = {r["index"]: r["tpot_s"] for r in real_records if r.get("tpot_s")}
    if streams is None:
        streams = concurrent_streams([r for r in real_records if r.get("tpot_s")])
    out = {}
    for label, low, high in STREAM_BUCKETS:
        ratios = [sim[i] / real[i] for i in real if i in sim and low <= streams.get(i, 0) <= high]
        if ratios:
            out[label] = {"num_requests": len(ratios), "median_ratio": statistics.median(ratios)}
    return out


def describe_ratios(by_streams: dict[str, dict]) -> str:
    return ", ".join(f"{label}: x{b['median_ratio']:.3f} ({b['num_requests']})" for label, b in by_streams.items())


COLUMNS = (("requests", "num_requests", "{:.0f}"), ("tokens/req", "tokens", "{:.0f}"),
           ("steps/token", "steps_per_token", "{:.3f}"), ("mixed", "mixed_share", "{:.1%}"),
           ("rows", "rows", "{:.1f}"), ("decode ms", "decode_step_ms", "{:.2f}"),
           ("(priced)", "decode_predicted_ms", "{:.2f}"), ("mixed ms", "mixed_step_ms", "{:.2f}"),
           ("(priced)", "mixed_predicted_ms", "{:.2f}"), ("engine TPOT", "engine_tpot_ms", "{:.2f}"),
           ("client TPOT", "tpot_ms", "{:.2f}"), ("by chunks", "chunk_tpot_ms", "{:.2f}"),
           ("TPOT p50", "tpot_p50_ms", "{:.2f}"))


def table_rows(label: str, side: str, breakdown: dict | None, client: dict | None) -> list[str]:
    merged = {**(breakdown or {}), **(client or {})}
    return [label, side] + ["-" if merged.get(key) is None else fmt.format(merged[key]) for _, key, fmt in COLUMNS]


HEADER = ["point", "side"] + [name for name, _, _ in COLUMNS]
