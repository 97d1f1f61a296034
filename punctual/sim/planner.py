"""`punctual sim plan`: the cheapest configuration that serves a rate within the SLOs.

For each scheduling policy and token budget, the fewest replicas whose simulated run keeps the
attainment target (DistServe's placement search, over what this engine has): replicas grow by
doubling until the target is met, then a bisection finds the smallest count. Every point
simulated is printed, so the frontier shows what each knob buys. `--pd-splits` adds
prefill/decode disaggregation to the search: each split is the prefill pool's share of the
replicas (0: colocated), and KV moves cost the profile's transfer time.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable

from punctual.bench.arrivals import arrival_offsets
from punctual.bench.metrics import SLO, slo_attainment, summarize
from punctual.bench.report import table
from punctual.bench.workloads import WORKLOADS, generate_workload
from punctual.sim.engine import Simulator
from punctual.sim.loadgen import SimSender
from punctual.sim.profile import load_profile
from punctual.sim.sizing import SimFlags, cluster_config


@dataclass(frozen=True)
class PlanConfig:
    """What `punctual sim plan` searches, and for what (fields named as its flags)."""

    profile: str  # step-cost profile file
    request_rate: float  # target requests per second
    ttft_slo_ms: float
    tpot_slo_ms: float
    workload: str = "chat"
    attainment_target: float = 0.9
    num_requests: int | None = None  # per candidate; None: 60 s of traffic, 500 to 20000
    seed: int = 0
    length_scale: float = 1.0
    burstiness: float = 1.0
    policies: tuple[str, ...] = ("fcfs", "slo")  # scheduling policies to try
    budgets: tuple[int, ...] = (256, 512, 1024, 2048)  # token budgets to try
    max_num_seqs: int = 128
    pd_splits: tuple[float, ...] = (0.0,)  # prefill shares of the replicas to try (0: colocated)
    min_replicas: int = 1
    max_replicas: int = 4096
    router: str = "least_loaded"
    block_size: int = 16
    kv_cache_memory: int | str | None = None
    num_kv_blocks: int | None = None
    cost_per_replica_hour: float | None = None
    output: str | None = None  # where to write the explored frontier as JSON


def pd_split(split: float, replicas: int) -> tuple[int, int]:
    """(prefill, decode) replicas for a prefill share `split` of `replicas`; (0, 0) colocated."""
    if split <= 0:
        return 0, 0
    prefill = max(1, min(replicas - 1, round(split * replicas)))
    return prefill, replicas - prefill


def split_label(split: float, replicas: int) -> str:
    prefill, decode = pd_split(split, replicas)
    return f"{prefill}P+{decode}D" if prefill else "colocated"


def evaluate(config: PlanConfig, profile, requests, offsets, slo: SLO, policy: str, budget: int,
             replicas: int, split: float = 0.0) -> dict:
    prefill, decode = pd_split(split, replicas)
    flags = SimFlags(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
                     scheduling_policy=policy, block_size=config.block_size, num_kv_blocks=config.num_kv_blocks,
                     kv_cache_memory=config.kv_cache_memory, replicas=replicas, router=config.router,
                     prefill_replicas=prefill, decode_replicas=decode)
    simulator = Simulator(cluster_config(flags, profile, slo), profile)
    result = SimSender(simulator, keep_token_times=False, slo=slo)(None, requests, offsets=offsets)
    summary = summarize(result, None)
    ttft, tpot = summary["ttft_ms"] or {}, summary["tpot_ms"] or {}
    e2e = summary["e2e_ms"] or {}
    return {"policy": policy, "max_num_batched_tokens": budget, "replicas": replicas, "split": split,
            "prefill_replicas": prefill, "decode_replicas": decode, "e2e_p50_ms": e2e.get("median"),
            "attainment": slo_attainment(result.records, slo), "ttft_p90_ms": ttft.get("p90"),
            "tpot_p90_ms": tpot.get("p90"), "completed": summary["completed"]}


def plan_capacity(config: PlanConfig, log: Callable[[str], None] = print) -> int:
    if config.workload not in WORKLOADS:
        raise ValueError(f"--workload: unknown {config.workload!r}; choose from {', '.join(WORKLOADS)}")
    if not config.request_rate > 0 or math.isinf(config.request_rate):
        raise ValueError(f"--request-rate: a finite positive rate, got {config.request_rate}")
    profile = load_profile(config.profile)
    slo = SLO(config.ttft_slo_ms / 1000, config.tpot_slo_ms / 1000)
    policies, budgets, splits = list(config.policies), list(config.budgets), list(config.pd_splits)
    if any(not 0 <= x < 1 for x in splits):
        raise ValueError(f"--pd-splits: prefill shares in [0, 1), got {','.join(f'{x:g}' for x in splits)!r}")
    num_requests = config.num_requests or int(min(20000, max(500, 60 * config.request_rate)))
    requests = generate_workload(config.workload, num_requests, config.seed, config.length_scale, salt=1)
    offsets = arrival_offsets(num_requests, config.request_rate, config.burstiness, config.seed)
    explored: list[dict] = []

    seen: dict[tuple, dict] = {}

    def passes(policy: str, budget: int, replicas: int, split: float) -> bool:
        key = (policy, budget, replicas, pd_split(split, replicas))  # two shares may round to one split
        point = seen.get(key)
        if point is None:
            point = seen[key] = evaluate(config, profile, requests, offsets, slo, policy, budget, replicas, split)
            explored.append(point)
            log(f"  {policy} budget {budget} x{replicas} {split_label(split, replicas)}: "
                f"attainment {point['attainment']:.1%}")
        return point["attainment"] >= config.attainment_target

    best: list[dict] = []
    for split, policy, budget in ((x, p, b) for x in splits for p in policies for b in budgets):
        least = max(config.min_replicas, 2 if split > 0 else 1)  # a split needs a replica on each side
        low, high = least - 1, least  # low is taken to fail; high is tried
        while not passes(policy, budget, high, split):
            low, high = high, high * 2
            if high > config.max_replicas:
                break
        if high > config.max_replicas:
            continue
        if high == least:
            low = 1 if split > 0 else 0  # the first count tried passed: fewer may too
        while high - low > 1:
            mid = (low + high) // 2
            if passes(policy, budget, mid, split):
                high = mid
            else:
                low = mid
        best.append(seen[(policy, budget, high, pd_split(split, high))])
    hourly = config.cost_per_replica_hour
    rows = [[split_label(p["split"], p["replicas"]), p["policy"], str(p["max_num_batched_tokens"]), str(p["replicas"]),
             f"{p['attainment']:.1%}", _ms(p["ttft_p90_ms"]), _ms(p["tpot_p90_ms"])]
            + ([f"{p['replicas'] * hourly:.2f}"] if hourly else [])
            for p in sorted(explored, key=lambda p: (p["split"], p["policy"], p["max_num_batched_tokens"],
                                                     p["replicas"]))]
    header = ["split", "policy", "budget", "replicas", "SLO", "TTFT p90", "TPOT p90"] + (["$/hour"] if hourly else [])
    print(f"explored ({config.workload} at {config.request_rate:g} req/s, {num_requests} requests simulated per point, "
          f"TTFT {config.ttft_slo_ms:g} ms, TPOT {config.tpot_slo_ms:g} ms, target {config.attainment_target:.0%}):")
    print(table(header, rows))
    if not best:
        print(f"\nno configuration within {config.max_replicas} replicas meets the target")
        return 1
    cheapest = min(best, key=lambda p: (p["replicas"], -p["attainment"]))
    estimate = " (an ESTIMATE: roofline profile)" if profile.estimate else ""
    cost = f", {cheapest['replicas'] * hourly:.2f} per hour" if hourly else ""
    print(f"\ncheapest: {cheapest['replicas']} replica(s) of {profile.model.get('name')} on "
          f"{profile.machine.get('hardware') or profile.machine.get('cpu')}"
          f" ({split_label(cheapest['split'], cheapest['replicas'])}), policy {cheapest['policy']}, "
          f"--max-num-batched-tokens {cheapest['max_num_batched_tokens']}: attainment {cheapest['attainment']:.1%}"
          f"{cost}{estimate}")
    traffic_s = offsets[-1]
    if cheapest["e2e_p50_ms"] and traffic_s < 10 * cheapest["e2e_p50_ms"] / 1000:
        print(f"warning: {traffic_s:.1f} s of traffic is under 10 median request lifetimes "
              f"({cheapest['e2e_p50_ms'] / 1000:.1f} s each): the run may end before queues reach steady state, "
              "so the answer can be too optimistic; raise --num-requests")
    if config.output:
        with open(config.output, "w") as f:
            json.dump({"config": dataclasses.asdict(config), "explored": explored,
                       "frontier": best, "cheapest": cheapest}, f, indent=1)
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
