"""A cluster split across worker processes: each simulates a fixed share of the replicas.

Only for routing that reads no replica state (round_robin; the routers that read it shard under
sim/stale.py, on state a window late): then which replica a request goes
to is known before it is simulated, and the shards never need each other's clocks, so they run
in parallel and their answers are exactly the one-process simulator's. Shard s owns replicas
s, s + S, s + 2S, ... (global ids); a worker keeps its replicas (prefix caches, cost models)
from one run to the next, as the one-process simulator does.

Workers are forked, so they start with this process's imports and the profile; each run sends
every shard only its own requests and gets back records and streamed statistics. A worker
simulates its replicas one after another, each over the whole run (`run_replica_by_replica`).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import traceback

from punctual.sim.engine import SimConfig, SimRequest, Simulator
from punctual.sim.profile import StepProfile


def _worker(connection, config: SimConfig, profile: StepProfile) -> None:
    from punctual.sim.loadgen import SimSender, token_ids

    simulator = Simulator(config, profile)
    sender = SimSender(simulator)
    while True:
        command = connection.recv()
        if command is None:
            return
        start, items, offsets, routes, keep_token_times, slo = command
        try:
            sender.keep_token_times, sender.slo = keep_token_times, slo
            simulator.now = start  # every shard starts the run at the cluster's clock
            requests = [SimRequest(index, token_ids(r.prompt), r.output_len, r.user, r.prompt_len)
                        for index, r in items]
            records, stats, duration = run_replica_by_replica(sender, requests, offsets, routes)
            connection.send(("ok", records, stats, duration, simulator.now, simulator.num_events,
                             simulator.num_steps))
        except BaseException:
            connection.send(("error", traceback.format_exc()))


def run_replica_by_replica(sender, requests: list[SimRequest], offsets: list[float], routes: list[int]):
    """SimSender.run_local, one replica at a time: each replica's requests run alone, from the
    same start, and the answers are merged. With routing decided outside (a shard's), a replica's
    events depend on its own arrivals only, so each comes out as in one run over all of them. The
    gain is locality: interleaved, every step of 500 replicas finds its replica's requests, block
    tables and caches evicted by the others' (7 us of CPU per output token at 500 replicas a
    process, against ~2-3 at a few); alone, a replica's working set stays in the CPU's caches."""
    from punctual.sim.loadgen import StreamedStats

    simulator = sender.simulator
    start, run_id = simulator.now, simulator._run_id
    by_replica: dict[int, list[int]] = {}
    for position, route in enumerate(routes):
        by_replica.setdefault(route, []).append(position)
    records, stats, duration, end = [], StreamedStats(), 0.0, start
    for route in sorted(by_replica):
        positions = by_replica[route]
        simulator.now, simulator._run_id = start, run_id  # the same clock and request ids as one run
        replica_records, replica_stats, replica_duration = sender.run_local(
            [requests[p] for p in positions], offsets=[offsets[p] for p in positions], routes=[route] * len(positions))
        records.extend(replica_records)
        stats.merge(replica_stats)
        duration = max(duration, replica_duration)
        end = max(end, simulator.now)
    simulator.now, simulator._run_id = end, run_id + 1
    records.sort(key=lambda r: r.index)
    return records, stats, duration


class ShardedSimulator:
    """The Simulator's interface for SimSender (`run_shards`, `now`, `num_events`, `num_steps`)."""

    def __init__(self, config: SimConfig, profile: StepProfile, processes: int):
        if config.cluster.router != "round_robin":
            raise ValueError(f"--sim-processes: only with --router round_robin (routing that reads no replica "
                             f"state), got {config.cluster.router!r}")
        if config.cluster.prefill_replicas or config.cluster.migration:
            raise ValueError("--sim-processes: requests move between replicas (prefill/decode, --migration on); "
                             "run them in one process")
        processes = min(processes, config.replicas)
        self.config = config
        self.num_shards = processes
        self.now = 0.0
        self.num_events = 0
        self.num_steps = 0
        self._next = 0  # the round-robin counter, over global replica ids
        context = multiprocessing.get_context("fork")
        self._connections, self._processes = [], []
        for shard in range(processes):
            owned = len(range(shard, config.replicas, processes))
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, replicas=owned)), profile),
                                      daemon=True)
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)

    def run_shards(self, requests, offsets, concurrency, keep_token_times, slo):
        if concurrency is not None:
            if concurrency < len(requests):
                raise ValueError("--sim-processes: a closed loop (--concurrency) couples the replicas; "
                                 "run it in one process")
            offsets = [0.0] * len(requests)  # every client sends at once and none sends again
        shards = self.num_shards
        replicas = self.config.replicas
        items = [[] for _ in range(shards)]
        shard_offsets = [[] for _ in range(shards)]
        routes = [[] for _ in range(shards)]
        for index, (request, offset) in enumerate(zip(requests, offsets)):
            replica = (self._next + index) % replicas
            shard = replica % shards
            items[shard].append((index, request))
            shard_offsets[shard].append(offset)
            routes[shard].append(replica // shards)
        self._next += len(requests)
        for connection, *command in zip(self._connections, items, shard_offsets, routes):
            connection.send((self.now, *command, keep_token_times, slo))
        answers = []
        for connection in self._connections:
            answer = connection.recv()
            if answer[0] != "ok":
                raise RuntimeError(f"a simulator shard failed:\n{answer[1]}")
            answers.append(answer)
        return merge_shard_runs(self, answers)

    def close(self) -> None:
        close_shards(self._connections, self._processes)


def merge_shard_runs(simulator, answers: list[tuple]) -> tuple[list, "StreamedStats", float]:
    """One run's records, stats and duration from its shards' answers (tag, records, stats,
    duration, clock, events, steps), in arrival order; the simulator's clock and counts follow."""
    from punctual.sim.loadgen import StreamedStats

    records, stats, duration, now = [], StreamedStats(), 0.0, simulator.now
    simulator.num_events = simulator.num_steps = 0
    for _, shard_records, shard_stats, shard_duration, shard_now, events, steps in answers:
        records.extend(shard_records)
        stats.merge(shard_stats)
        duration = max(duration, shard_duration)
        now = max(now, shard_now)
        simulator.num_events += events
        simulator.num_steps += steps
    simulator.now = now
    records.sort(key=lambda r: r.index)
    return records, stats, duration


def close_shards(connections, processes) -> None:
    """Tell every worker to stop (one already gone is fine) and wait a little for each."""
    for connection in connections:
        try:
            connection.send(None)
        except (BrokenPipeError, OSError):
            pass
    for process in processes:
        process.join(5)
