"""A cluster split across worker processes: each simulates a fixed share of the replicas.

Only for routing that reads no replica state (round_robin): then which replica a request goes
to is known before it is simulated, and the shards never need each other's clocks, so they run
in parallel and their answers are exactly the one-process simulator's. Shard s owns replicas
s, s + S, s + 2S, ... (global ids); a worker keeps its replicas (prefix caches, cost models)
from one run to the next, as the one-process simulator does.

Workers are forked, so they start with this process's imports and the profile; each run sends
every shard only its own requests and gets back records and streamed statistics.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import traceback

from punctual.sim.engine import ClusterConfig, SimRequest, Simulator
from punctual.sim.profile import StepProfile


def _worker(connection, config: ClusterConfig, profile: StepProfile) -> None:
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
            records, stats, duration = sender.run_local(requests, offsets=offsets, routes=routes)
            connection.send(("ok", records, stats, duration, simulator.now, simulator.num_events,
                             simulator.num_steps))
        except BaseException:
            connection.send(("error", traceback.format_exc()))


class ShardedSimulator:
    """The Simulator's interface for SimSender (`run_shards`, `now`, `num_events`, `num_steps`)."""

    def __init__(self, config: ClusterConfig, profile: StepProfile, processes: int):
        if config.router != "round_robin":
            raise ValueError(f"--sim-processes: only with --router round_robin (routing that reads no replica "
                             f"state), got {config.router!r}")
        if config.prefill_replicas:
            raise ValueError("--sim-processes: requests move between prefill and decode replicas; run P/D in "
                             "one process")
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
            process = context.Process(target=_worker, args=(child, dataclasses.replace(config, replicas=owned), profile),
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
        from punctual.sim.loadgen import StreamedStats

        records, stats, duration = [], StreamedStats(), 0.0
        now = self.now
        self.num_events = self.num_steps = 0
        for connection in self._connections:
            answer = connection.recv()
            if answer[0] != "ok":
                raise RuntimeError(f"a simulator shard failed:\n{answer[1]}")
            _, shard_records, shard_stats, shard_duration, shard_now, events, steps = answer
            records.extend(shard_records)
            stats.merge(shard_stats)
            duration = max(duration, shard_duration)
            now = max(now, shard_now)
            self.num_events += events
            self.num_steps += steps
        self.now = now
        records.sort(key=lambda r: r.index)
        return records, stats, duration

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(5)
