"""A serving core's step trace read back (engine/trace.py writes it), for `punctual sim
calibrate --server` and `punctual sim validate --server-trace`: the serving loop's step periods,
each request's first-token path, and the serving overhead fitted onto an offline profile.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from punctual.engine.trace import replica_trace_path, trace_paths


@dataclass
class ServerTrace:
    """A trace read back: step features with the serving loop's period, and request timings."""

    rows: list[tuple[float, ...]]
    seconds: list[float]
    adds: list[dict]  # in the order the core received them; "mid_step": it arrived while a step ran
    first_token_sent: dict[str, float]  # request id -> when the step with its first token was sent
    first_token_step: dict[str, int] = field(default_factory=dict)  # request id -> that step's index
    planned: list[float] = field(default_factory=list)  # per step, when it was planned
    # Per step, the requests that sampled a token in it (None: a trace written before the core
    # recorded them).
    sampled: list[list[str] | None] = field(default_factory=list)

    @property
    def admit_delays(self) -> list[float]:
        """Front end's arrival stamp -> the core has the request (HTTP body, tokenizing, the socket,
        and, for a request that arrived mid-step, the wait for that step to end)."""
        return [a["received"] - a["arrival"] for a in self.adds]

    @property
    def front_end_delays(self) -> list[float]:
        """admit_delays of the requests that found the core between steps: the front end's own
        share, without the wait for a step in flight (the simulator charges that wait itself)."""
        return [a["received"] - a["arrival"] for a in self.adds if not a["mid_step"]]


def read_traces(path: str) -> ServerTrace:
    """Every trace written for `path` (`trace_paths`), as one: each core's steps keep their own
    periods (a step lasts until that core plans its next), then the steps are concatenated with
    the first-token indices shifted to match; requests are in the order the cores received them
    (one clock: time.monotonic is the machine's, whatever the process); a request's first token
    is the earliest any core reported."""
    paths = trace_paths(path)
    if not paths:
        raise FileNotFoundError(f"no step trace was written to {path} (nor {replica_trace_path(path, 0)}, ...)")
    traces = [read_trace(p) for p in paths]
    if len(traces) == 1:
        return traces[0]
    merged = ServerTrace([], [], [], {})
    for trace in traces:
        offset = len(merged.rows)
        merged.rows += trace.rows
        merged.seconds += trace.seconds
        merged.planned += trace.planned
        merged.sampled += trace.sampled
        merged.adds += trace.adds
        # A request that moved (prefill/decode, migration) has its first token where it was made:
        # the earliest (a target core that did not know the request had one reported its own).
        for request_id, sent in trace.first_token_sent.items():
            if sent < merged.first_token_sent.get(request_id, float("inf")):
                merged.first_token_sent[request_id] = sent
                merged.first_token_step[request_id] = offset + trace.first_token_step[request_id]
    merged.adds.sort(key=lambda a: a["received"])
    return merged


def read_trace(path: str) -> ServerTrace:
    steps, adds = [], []
    with open(path) as file:
        for line in file:
            if not line.strip():
                continue
            record = json.loads(line)
            if "step" in record:
                steps.append(record)
            else:  # the core writes in the order it works: the last step written is the last it sent
                record["mid_step"] = bool(steps) and steps[-1]["sent"] > record["arrival"]
                adds.append(record)
    rows, seconds, first, first_step = [], [], {}, {}
    for i, step in enumerate(steps):
        following = steps[i + 1] if i + 1 < len(steps) else None
        # Back to back: the step lasted until the next was planned (commands taken in between
        # are the loop's cost too); after it the loop went idle: until its outputs were sent.
        end = following["planned"] if following is not None and not following["idle_before"] else step["sent"]
        rows.append(tuple(step["step"]))
        seconds.append(end - step["planned"])
        for request_id in step["first"]:
            first.setdefault(request_id, step["sent"])
            first_step.setdefault(request_id, i)
    return ServerTrace(rows, seconds, adds, first, first_step, [step["planned"] for step in steps],
                       [step.get("sampled") for step in steps])


def first_token_path(trace: ServerTrace, add: dict, client_ttft_s: float | None) -> dict | None:
    """Where one request's TTFT went, from the core's trace (and the client's TTFT if known):
    admit_s (front end: arrival stamp -> core has it), queued_s (-> the step that gave its first
    token was planned; a step in flight or earlier steps of its prompt), first_step_s (that step's
    serving period), deliver_s (the client's TTFT minus arrival -> that step sent: HTTP in and out,
    detokenizing, SSE), streams (rows sampled in that step), step (its features). None if it
    never got a token."""
    index = trace.first_token_step.get(add["add"])
    if index is None:
        return None
    sent = trace.first_token_sent[add["add"]]
    path = {"admit_s": add["received"] - add["arrival"], "queued_s": trace.planned[index] - add["received"],
            "first_step_s": trace.seconds[index], "streams": trace.rows[index][5], "mid_step": add["mid_step"],
            "prompt_tokens": add.get("prompt_tokens"), "step_prefill_tokens": trace.rows[index][1],
            "step": trace.rows[index]}
    path["deliver_s"] = None if client_ttft_s is None else client_ttft_s - (sent - add["arrival"])
    return path


def match_records(adds: list[dict], records: list[dict], start: int = 0) -> tuple[list[dict | None], int]:
    """The traced request of each client record (in send order), by prompt length and max_tokens,
    walking the trace from `start` and skipping what the client did not record (warm-ups).
    Returns the matches (None where none was found) and where the walk ended."""
    matched: list[dict | None] = [None] * len(records)
    cursor = start
    for i in sorted(range(len(records)), key=lambda i: records[i]["sent_s"]):
        key = (records[i].get("prompt_tokens"), records[i].get("output_len"))
        found = next((j for j in range(cursor, min(cursor + 64, len(adds)))
                      if (adds[j].get("prompt_tokens"), adds[j].get("max_tokens")) == key), None)
        if found is not None:
            matched[i], cursor = adds[found], found + 1
    return matched, cursor


def delivery_line(deliveries: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares of deliver = fixed + per_stream x streams over (streams in the first token's
    step, delivery delay) pairs: (fixed, per_stream) seconds, or None with fewer than two distinct
    stream counts (no slope to see)."""
    import numpy as np

    streams = np.asarray([s for s, _ in deliveries], dtype=float)
    if len(set(streams.tolist())) < 2:
        return None
    x = np.stack([np.ones_like(streams), streams], axis=1)
    (fixed, per_stream), *_ = np.linalg.lstsq(x, np.asarray([d for _, d in deliveries], dtype=float), rcond=None)
    return float(fixed), float(per_stream)


def step_weights(rows: list[tuple[float, ...]]) -> list[float]:
    """Each step's weight in the serving fit: the streams it delivers a token to (its sampled rows),
    at least one. A request's TPOT is the mean period of the steps it decodes in, so the mean TPOT
    is the mean step time weighted by rows: a step of 30 streams is in 30 requests' TPOT, a
    single-stream step in one."""
    return [max(1.0, x[5]) for x in rows]


def fit_serving_overhead(predict, rows: list[tuple[float, ...]], seconds: list[float],
                         wild: float = 50.0) -> tuple[dict[str, float], list[int]]:
    """What the serving loop adds to an offline profile's step, by least squares on the traced
    steps: seconds - predict(x) ~ extra_scale x predict(x) + overhead_s + per_row_s x sampled rows
    + prefill_step_s if the step carries prompt tokens, none negative (serving is never cheaper
    than the model call alone).

    The prefill-step term: a step that takes in a new prompt runs while the front end sets up
    that request's stream on the same cores (a quiet builtin trace: +3.4 ms mean over 74 such
    steps, against -0.1 ms over 3,972 decode-only steps), so it costs more than its shape says.

    The per-row term: the front end detokenizes and sends every stream's token of a step (and the
    clients read them) on the cores the step runs on, so a step costs more per stream served
    than the model's share. Each step is weighted by the streams it serves (`step_weights`): with
    the fixed and prefill-step terms in the fit, the fitted price then matches the measured time
    on the rows-weighted mean of decode-only steps and of steps with prompt tokens alike, which
    is the mean TPOT a client sees. Unweighted, a trace of mostly single-stream steps (the
    one-at-a-time phase, low rates) set every term, and the simulator's TPOT came out early the
    more streams a request shared its steps with (quiet smollm2 validations: sim / real TPOT 0.95
    for requests alone, 0.85 beside 3 others, 0.79 beside 4).

    Absolute, not relative, errors, and no interference filter: the simulator's TPOT is a mean of
    step times, and the front end's contention with the core is the serving loop's cost, not
    noise. Only wild steps (over `wild` x the median ratio to the offline prediction: a page
    fault, a stray process) are left out. Returns ({"scale", "overhead_s", "per_row_s",
    "prefill_step_s"}, kept)."""
    import numpy as np

    base = np.asarray([predict(x) for x in rows], dtype=float)
    y = np.asarray(seconds, dtype=float)
    sampled = np.asarray([x[5] for x in rows], dtype=float)
    prefill = np.asarray([x[1] > 0 for x in rows], dtype=float)
    ratio = y / np.maximum(base, 1e-9)
    kept = np.nonzero(ratio <= wild * max(float(np.median(ratio)), 1.0))[0]
    root_weight = np.sqrt(np.asarray(step_weights(rows), dtype=float))[kept]
    columns = np.stack([base, np.ones_like(base), sampled, prefill], axis=1)[kept] * root_weight[:, None]
    residual = (y - base)[kept] * root_weight
    active = [a for a in range(columns.shape[1]) if columns[:, a].any()]
    while True:
        solution, *_ = np.linalg.lstsq(columns[:, active], residual, rcond=None)
        negative = [a for a, c in zip(active, solution) if c < 0]
        if not negative or len(active) == 1:
            break
        active.remove(min(negative, key=lambda a: solution[active.index(a)]))
    coefficients = [0.0] * columns.shape[1]
    for a, c in zip(active, solution):
        coefficients[a] = max(0.0, float(c))
    return ({"scale": 1.0 + coefficients[0], "overhead_s": coefficients[1], "per_row_s": coefficients[2],
             "prefill_step_s": coefficients[3]}, [int(i) for i in kept])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
