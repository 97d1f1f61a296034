"""Runs against one endpoint (workloads x rates) and the goodput search over them.

Goodput, as DistServe (Zhong et al., OSDI'24) defines it: the highest request rate at which at
least 90% of requests meet both their TTFT and TPOT SLOs. Measured attainment is noisy, so a
rate sweep's goodput is the highest rate below the first rate that fails: a pass above a
failure is treated as noise, not capacity. A bisection narrows the crossing between a rate
that passes and one that fails.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable

from punctual.bench import loadgen
from punctual.bench.arrivals import arrival_offsets
from punctual.bench.metrics import DEFAULT_ATTAINMENT_TARGET, SLO, summarize
from punctual.bench.workloads import generate_workload, load_trace


def goodput_from_points(points: list[tuple[float, float]], target: float = DEFAULT_ATTAINMENT_TARGET) -> float | None:
    """The highest rate below the first failing one, from (rate, attainment) pairs; None if the lowest fails."""
    best = None
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best


def bisect_goodput(evaluate: Callable[[float], float], low: float, high: float, steps: int = 4,
                   target: float = DEFAULT_ATTAINMENT_TARGET) -> tuple[float | None, list[tuple[float, float]]]:
    """Search [low, high] for the highest passing rate with `steps` bisections after the two ends.

    Returns the goodput (None if `low` already fails; `high` if it passes) and every
    (rate, attainment) measured, in the order measured.
    """
    if not 0 < low < high:
        raise ValueError(f"bisection range: need 0 < low < high, got {low}, {high}")
    points = [(low, evaluate(low))]
    if points[-1][1] < target:
        return None, points
    points.append((high, evaluate(high)))
    if points[-1][1] >= target:
        return high, points
    for _ in range(steps):
        mid = (low + high) / 2
        points.append((mid, evaluate(mid)))
        if points[-1][1] >= target:
            low = mid
        else:
            high = mid
    return low, points


@dataclass(frozen=True)
class BenchPlan:
    """What to run against each endpoint."""

    workloads: tuple[str, ...] = ("chat",)
    num_requests: int = 100
    seed: int = 0
    length_scale: float = 1.0
    text: str = "real"  # prompt text: real (questions, documentation, source code) or synthetic words
    rates: tuple[float, ...] = (1.0,)        # open loop, one run per rate (inf: all at once)
    burstiness: float = 1.0
    concurrency: int | None = None           # closed loop instead of rates
    trace: str | None = None                 # replay a trace instead of a workload and rates
    bisect: tuple[float, float] | None = None  # search goodput in this range instead of `rates`
    bisect_steps: int = 4
    slo: SLO | None = None
    target: float = DEFAULT_ATTAINMENT_TARGET
    warmup_requests: int = 2
    keep_records: bool = True
    temperature: float = 0.0                 # sampling of every request (0: greedy)
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.bisect is not None and self.slo is None:
            raise ValueError("--sweep-bisect: a goodput search needs --ttft-slo-ms and --tpot-slo-ms")


def bench_endpoint(endpoint: loadgen.Endpoint, plan: BenchPlan, system: str = "server",
                   progress: bool = True, log: Callable[[str], None] = print,
                   send: Callable[..., loadgen.LoadResult] | None = None,
                   before_run: Callable[[str, float | None], None] | None = None) -> list[dict]:
    """Every run of `plan` against `endpoint`, each as {system, workload, rate, ..., summary, records}.

    `send` replaces `loadgen.run` (same arguments and result): the simulator answers the same
    requests, warm-ups and sweeps in virtual time. `before_run(workload, rate)` is called before
    each measured run (after its workload's warm-up), once per run and in their order."""
    send = send or loadgen.run
    runs: list[dict] = []
    sampling = {"temperature": plan.temperature, **({"top_k": plan.top_k} if plan.top_k else {})}
    endpoint = dataclasses.replace(endpoint, extra_body={**sampling, **endpoint.extra_body})

    def run_once(workload: str, requests, label: str, rate: float | None = None,
                 concurrency: int | None = None) -> dict:
        offsets = None if rate is None else arrival_offsets(len(requests), rate, plan.burstiness, plan.seed)
        if before_run is not None:
            before_run(workload, rate)
        result = send(endpoint, requests, offsets=offsets, concurrency=concurrency, progress=progress,
                             desc=f"{system} {workload} {label}")
        summary = summarize(result, plan.slo)
        run = {"system": system, "workload": workload, "rate": rate, "concurrency": concurrency,
               "summary": summary}
        if plan.keep_records:
            run["records"] = [r.to_json() for r in result.records]
        runs.append(run)
        log(_one_line(run))
        return run

    for workload in (("trace",) if plan.trace else plan.workloads):
        warm_up(endpoint, workload, plan, progress, send)
        if plan.trace:
            run_once(workload, load_trace(plan.trace, plan.seed, plan.length_scale), "trace")
            continue
        salts = itertools.count(1)

        def fresh_requests():
            # Each run its own salt: same lengths, other words, so no run hits the prefix cache
            # another left behind (shared-prefix keeps its shared documents, by design).
            return generate_workload(workload, plan.num_requests, plan.seed, plan.length_scale, next(salts),
                                     plan.text)

        if plan.concurrency is not None:
            run_once(workload, fresh_requests(), f"concurrency {plan.concurrency}", concurrency=plan.concurrency)
            continue

        def at_rate(rate: float) -> float:
            run = run_once(workload, fresh_requests(), f"{rate:g} req/s", rate=rate)
            return run["summary"].get("slo", {}).get("attainment", 0.0)

        if plan.bisect is not None:
            bisect_goodput(at_rate, *plan.bisect, steps=plan.bisect_steps, target=plan.target)
        else:
            for rate in plan.rates:
                at_rate(rate)
    return runs


def warm_up(endpoint: loadgen.Endpoint, workload: str, plan: BenchPlan, progress: bool,
            send: Callable[..., loadgen.LoadResult] | None = None) -> None:
    """A few requests first, unmeasured, so one-time costs (lazy init, first allocations) stay out.

    Salt 0, which no measured run uses: the warm-up leaves no measured prompt in a prefix
    cache, except shared-prefix's shared documents, which a server in steady state holds.
    """
    if plan.warmup_requests <= 0:
        return
    requests = generate_workload("chat" if workload == "trace" else workload, plan.warmup_requests,
                                 plan.seed, plan.length_scale, salt=0, text=plan.text)
    (send or loadgen.run)(endpoint, requests, concurrency=len(requests), progress=progress, desc="warm-up")


def goodputs(runs: list[dict], target: float = DEFAULT_ATTAINMENT_TARGET) -> dict:
    """{system: {workload: {"goodput": rate or None, "rates": rates measured}}} from rate runs
    that carry SLO attainment. A goodput equal to the highest rate measured is a lower bound."""
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for run in runs:
        if run.get("rate") is not None and "slo" in run["summary"]:
            points.setdefault((run["system"], run["workload"]), []).append(
                (run["rate"], run["summary"]["slo"]["attainment"]))
    table: dict[str, dict] = {}
    for (system, workload), pts in points.items():
        table.setdefault(system, {})[workload] = {"goodput": goodput_from_points(pts, target),
                                                  "rates": sorted(rate for rate, _ in pts)}
    return table


def _one_line(run: dict) -> str:
    s = run["summary"]
    if run["rate"] is not None:
        where = "all at once" if math.isinf(run["rate"]) else f"{run['rate']:g} req/s"
    else:
        where = f"concurrency {run['concurrency']}" if run["concurrency"] else "trace"
    ttft, tpot = s["ttft_ms"] or {}, s["tpot_ms"] or {}
    line = (f"{run['system']} {run['workload']} {where}: {s['completed']}/{s['requests']} ok, "
            f"{s['output_throughput']:.1f} tok/s, TTFT p50 {ttft.get('median', float('nan')):.0f} ms, "
            f"TPOT p50 {tpot.get('median', float('nan')):.1f} ms")
    if "slo" in s:
        line += f", SLO attainment {s['slo']['attainment']:.0%}"
    return line
