"""`punctual sim validate` on a cluster: where the requests went, real against simulated.

Latencies alone can agree for the wrong reason (two wrong replicas averaging out), so with
`--replicas N` or `--prefill-replicas P --decode-replicas D` each measured point also keeps, per
replica, what the router and the prefix caches did, and the same from the simulator:

- requests: those the router sent there (real: the replica core's own trace of the requests it
  took in, `punctual.engine.trace`; simulated: the shipped router's choices in the simulator);
- prefix-cache queries and hits (prompt tokens): real from the server's `/metrics`, labelled per
  replica (`punctual_prefix_cache_queries` / `_hits`), as deltas over the point; simulated from
  each replica's KV manager;
- with prefill/decode, the KV moves that landed on the decode pool, and what the real moves'
  copies took (`GET /admin/migrations`: `transfer_s` over its rounds) against what the profile's
  transfer cost prices the same blocks at (one pre-copy round and the final copy).

Warm-ups are left out: each point's numbers are the change over its measured run.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

from punctual.bench.report import table
from punctual.sim.move_cost import http_get, migrations, server_root

SETTLE_S = 0.3  # the cores send their stats when they go idle: two reads this far apart that agree
SETTLE_DEADLINE_S = 10.0


# ---- the real cluster --------------------------------------------------------------------------
def parse_replica_metrics(text: str) -> dict[int, dict[str, float]]:
    """Per replica id, the prefix-cache counters of a Prometheus exposition of `punctual serve`
    with replicas ({"prefix_cache_queries", "prefix_cache_hits"}; absent replicas: not reported)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"punctual_prefix_cache_queries": "prefix_cache_queries",
              "punctual_prefix_cache_hits": "prefix_cache_hits"}
    out: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        key = wanted.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            replica = sample.labels.get("replica")
            if replica is not None and sample.name in (family.name, family.name + "_total"):
                out.setdefault(int(replica), {})[key] = sample.value
    return out


def settled_metrics(base_url: str, get: Callable[[str], bytes] = http_get,
                    sleep: Callable[[float], None] = time.sleep) -> dict[int, dict[str, float]]:
    """The per-replica counters once they stop moving (the last stats of a run reach the front
    end when each core goes idle), or the last read at the deadline."""
    previous = None
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while True:
        current = parse_replica_metrics(get(base_url + "/metrics").decode())
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current
        sleep(SETTLE_S)


class WatchedServer:
    """`send` for bench_endpoint against a real cluster: runs loadgen.run and keeps, per measured
    run (warm-ups left out), its monotonic window, its per-replica prefix-cache deltas and the
    moves that finished during it. `requests_per_replica` then counts each window's traced adds."""

    def __init__(self, send: Callable, base_url: str, get: Callable[[str], bytes] = http_get):
        self.send, self.base_url, self.get = send, server_root(base_url), get
        self.points: list[dict] = []

    def __call__(self, endpoint, requests, **kwargs):
        if kwargs.get("desc") == "warm-up":
            return self.send(endpoint, requests, **kwargs)
        # Read right before the run: a speed probe (--rescale-per-point) may have run since the last.
        before, seen = settled_metrics(self.base_url, self.get), len(migrations(self.base_url, self.get))
        started = time.monotonic()
        result = self.send(endpoint, requests, **kwargs)
        ended = time.monotonic()
        after = settled_metrics(self.base_url, self.get)
        self.points.append({"window": (started, ended), "prefix": counter_deltas(before, after),
                            "moves": migrations(self.base_url, self.get)[seen:]})  # the list keeps the last 1000
        return result


def counter_deltas(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]]) -> dict[int, dict]:
    return {replica: {k: v - before.get(replica, {}).get(k, 0.0) for k, v in values.items()}
            for replica, values in after.items()}


def requests_per_replica(adds_by_replica: list[list[dict]], window: tuple[float, float]) -> dict[int, int]:
    """Per replica (in trace-file order, which is replica order), its traced adds whose front-end
    arrival stamp falls in the window (one clock: time.monotonic is the machine's)."""
    start, end = window
    return {replica: sum(start <= a["arrival"] <= end for a in adds) for replica, adds in enumerate(adds_by_replica)}


def real_replica_runs(watch: WatchedServer, trace_path: str, num_replicas: int) -> list[dict]:
    """Each measured point's per-replica outcome on the real cluster: {"replicas": {id: {...}},
    "moves": [...]} in the plan's order."""
    from punctual.engine.trace import trace_paths
    from punctual.sim.trace import read_trace

    paths = [p for p in trace_paths(trace_path) if ".replica" in p]
    adds = [read_trace(p).adds for p in paths]
    if len(adds) != num_replicas:
        raise RuntimeError(f"{len(adds)} replica traces under {trace_path}, expected {num_replicas}")
    out = []
    for point in watch.points:
        counts = requests_per_replica(adds, point["window"])
        out.append({"replicas": {r: {"requests": counts.get(r, 0),
                                     "prefix_cache_queries": point["prefix"].get(r, {}).get("prefix_cache_queries", 0.0),
                                     "prefix_cache_hits": point["prefix"].get(r, {}).get("prefix_cache_hits", 0.0)}
                                 for r in range(num_replicas)},
                    "moves": point["moves"]})
    return out


# ---- the simulated cluster ---------------------------------------------------------------------
class WatchedSimulator:
    """`send` for bench_endpoint on a simulator: wraps its sender and keeps, per measured run, the
    requests the router sent to each replica, each replica's prefix-cache deltas and the moves
    that landed, by reason."""

    def __init__(self, sender, simulator):
        self.sender, self.simulator = sender, simulator
        self.points: list[dict] = []
        self.routed: Counter = Counter()
        front = simulator.front
        route = front.route

        # The simulator asks its front end for every arrival's replica; counting here sees the
        # shipped router's choices without a counter in the event loop.
        def counted(*args, **kwargs):
            replica = route(*args, **kwargs)
            self.routed[replica] += 1
            return replica
        front.route = counted

    def _snapshot(self) -> dict:
        return {"routed": Counter(self.routed), "moves": dict(self.simulator.moves),
                "prefix": {r.replica_id: {"prefix_cache_queries": r.kv.prefix_queries,
                                          "prefix_cache_hits": r.kv.prefix_hits} for r in self.simulator.replicas}}

    def __call__(self, endpoint, requests, **kwargs):
        before = self._snapshot()
        result = self.sender(endpoint, requests, **kwargs)
        if kwargs.get("desc") != "warm-up":
            after = self._snapshot()
            prefix = counter_deltas(before["prefix"], after["prefix"])
            self.points.append({
                "replicas": {r: {"requests": after["routed"][r] - before["routed"][r], **prefix[r]}
                             for r in sorted(prefix)},
                "moves": {reason: n - before["moves"].get(reason, 0) for reason, n in after["moves"].items()}})
        return result


# ---- the comparison ----------------------------------------------------------------------------
def hit_rate(values: dict) -> float | None:
    queries = values.get("prefix_cache_queries") or 0
    return values.get("prefix_cache_hits", 0) / queries if queries else None


def routing_rows(real_runs: list[dict], sim_runs: list[dict]) -> list[dict]:
    """One row per point and replica: requests and prefix-cache hit rate, real and simulated, and
    the replica's share of the point's requests on each side (`share_error`: simulated - real, in
    fractions of the point's requests)."""
    rows = []
    for real, sim in zip(real_runs, sim_runs):
        real_replicas, sim_replicas = _keyed(real["cluster"]["replicas"]), _keyed(sim["cluster"]["replicas"])
        if set(real_replicas) != set(sim_replicas):
            raise ValueError(f"replicas {sorted(real_replicas)} measured, {sorted(sim_replicas)} simulated")
        total_real = sum(v["requests"] for v in real_replicas.values())
        total_sim = sum(v["requests"] for v in sim_replicas.values())
        for replica in sorted(real_replicas):
            r, s = real_replicas[replica], sim_replicas[replica]
            share_real = r["requests"] / total_real if total_real else None
            share_sim = s["requests"] / total_sim if total_sim else None
            rows.append({"workload": real["workload"], "rate": real["rate"], "replica": replica,
                         "requests_real": r["requests"], "requests_sim": s["requests"],
                         "share_error": None if share_real is None or share_sim is None else share_sim - share_real,
                         "hit_rate_real": hit_rate(r), "hit_rate_sim": hit_rate(s)})
    return rows


def balance_errors(routing: list[dict]) -> dict[tuple[str, float], float]:
    """Per point, how far the spread of requests over the replicas differs, whichever replica
    took which share: the largest gap between the k-th largest share on each side. Identical
    replicas are interchangeable: a router that puts a hot prefix on replica 1 where the real
    one chose replica 0 (a tie broken the other way) spreads the load as it does."""
    points: dict[tuple[str, float], tuple[list[int], list[int]]] = {}
    for row in routing:
        real, sim = points.setdefault((row["workload"], row["rate"]), ([], []))
        real.append(row["requests_real"])
        sim.append(row["requests_sim"])
    out = {}
    for key, (real, sim) in points.items():
        total_real, total_sim = sum(real) or 1, sum(sim) or 1
        out[key] = max(abs(s / total_sim - r / total_real)
                       for r, s in zip(sorted(real, reverse=True), sorted(sim, reverse=True)))
    return out


def move_rows(real_runs: list[dict], sim_runs: list[dict], profile, block_size: int) -> list[dict]:
    """Prefill/decode: per point, the KV moves that landed (real, simulated) and what a real move's
    copies took on average against the profile's price of the same blocks (`price_error`)."""
    rows = []
    for real, sim in zip(real_runs, sim_runs):
        landed = [m for m in real["cluster"]["moves"] if m.get("ok") and m.get("reason") == "disaggregation"]
        measured = [m["transfer_s"] for m in landed]
        priced = [price_move(profile, m, block_size) for m in landed]
        mean_measured = sum(measured) / len(measured) if measured else None
        mean_priced = sum(priced) / len(priced) if priced else None
        rows.append({"workload": real["workload"], "rate": real["rate"], "moves_real": len(landed),
                     "moves_sim": sim["cluster"]["moves"].get("disaggregation", 0),
                     "transfer_ms_real": None if mean_measured is None else mean_measured * 1000,
                     "transfer_ms_sim": None if mean_priced is None else mean_priced * 1000,
                     "price_error": (mean_priced - mean_measured) / mean_measured if mean_measured else None})
    return rows


def price_move(profile, move: dict, block_size: int) -> float:
    """The simulator's cost of a real move's copies: a pre-copy round of its pre-copied blocks
    (when there were any) and the final stop-and-copy round (the simulator's rounds, priced by
    `StepProfile.transfer_seconds`)."""
    seconds = profile.transfer_seconds(move.get("final_blocks", 0), block_size)
    if move.get("precopy_blocks"):
        seconds += profile.transfer_seconds(move["precopy_blocks"], block_size)
    return seconds


def print_cluster(real_runs: list[dict], sim_runs: list[dict], profile, block_size: int,
                  log: Callable[[str], None] = print) -> dict:
    """Print the routing table (and with prefill/decode the moves'); returns them for --output."""
    routing = routing_rows(real_runs, sim_runs)
    print(table(["workload", "rate", "replica", "requests real", "sim", "share error", "hit rate real", "sim"],
                [[r["workload"], f"{r['rate']:g}", r["replica"], r["requests_real"], r["requests_sim"],
                  _points(r["share_error"]), _pct(r["hit_rate_real"]), _pct(r["hit_rate_sim"])] for r in routing]))
    shares = [abs(r["share_error"]) for r in routing if r["share_error"] is not None]
    gaps = [abs(r["hit_rate_sim"] - r["hit_rate_real"]) for r in routing
            if r["hit_rate_real"] is not None and r["hit_rate_sim"] is not None]
    balance = balance_errors(routing)
    if shares:
        log(f"routing: requests' share per replica off by {max(shares):.0%} of a point's requests at worst "
            f"({max(balance.values()):.0%} with the replicas ranked by their share on each side); "
            + (f"prefix-cache hit rate off by {max(gaps) * 100:.0f} points at worst" if gaps else "no prefix lookups"))
    out = {"routing": routing, "balance_error": [{"workload": w, "rate": r, "error": e}
                                                 for (w, r), e in balance.items()]}
    if any(run["cluster"]["moves"] for run in real_runs) or any(run["cluster"]["moves"] for run in sim_runs):
        moves = move_rows(real_runs, sim_runs, profile, block_size)
        print(table(["workload", "rate", "moves real", "sim", "copy ms real", "priced", "error"],
                    [[m["workload"], f"{m['rate']:g}", m["moves_real"], m["moves_sim"], _ms(m["transfer_ms_real"]),
                      _ms(m["transfer_ms_sim"]), "-" if m["price_error"] is None else f"{m['price_error']:+.0%}"]
                     for m in moves]))
        out["moves"] = moves
    return out


def _keyed(replicas: dict) -> dict[int, dict]:
    return {int(k): v for k, v in replicas.items()}  # JSON (--measured) keeps the ids as strings


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.0f} pt"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
