"""A cluster split across worker processes under a router that reads replica state a window late.

The routers that read replica state (cache_aware, least_loaded) couple every replica to every
decision, so the shards of sim/shards.py cannot run them. Here the router lives in the parent
and the shards meet it at window boundaries in virtual time. Windows are half the staleness
long: the arrivals of the window [b, b + w) are routed on the replicas' state as the shards
published it at b - w (their loads as the cluster client counts them, their free KV blocks, and
the prefix-cache block events up to b - w), plus the router's own bookkeeping of what it routed
since (its optimistic load, the front end's queued counts, cache_aware's record of the prompt
blocks it sent). So the router decides a window while the shards simulate the one before, and
the shards always hold their next command: nobody waits unless the router is slower than the
shards. A decision reads state between half the staleness and all of it old; nothing else
differs from one process, and which state a decision reads does not depend on the processes'
timing. A real front end reads its replicas' reports late too (they arrive after each step).

With staleness 0 a window is one arrival instant: the shards stop there after its step ends,
before anything is taken in or planned, publish, and the router decides on exactly what the
one-process simulator's router sees, so the answers are the same (tests/sim/test_stale.py).
The shards wait while it decides.

Shard s owns replicas s, s + S, s + 2S, ... (global ids), as in sim/shards.py; a worker keeps its
replicas from one run to the next. One command and one answer per window and shard: the
arrivals routed so far go out with the next boundary, the state at that boundary comes back;
windows without arrivals are skipped. The shards' replicas know which blocks the run's prompts
look up (Simulator.set_lookups), as one process's do, so the blocks no prompt reaches are
neither applied at every window's end nor sent to the router.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import traceback
from collections import deque

from punctual.cluster.router import ReplicaLoad, make_router
from punctual.sim.engine import ARRIVAL, SimConfig, SimRequest, Simulator, _long_lived_objects_frozen, lookup_sets
from punctual.sim.profile import StepProfile
from punctual.sim.routing import reads_blocks
from punctual.sim.shards import close_shards, merge_shard_runs
from punctual.sim.spread import draw, request_key, step_stream, uniform


class _BlockEvents:
    """Stands in for the router in a shard's FrontEnd hooks: records the block events the
    replicas' prefix caches raise, under global replica ids, for the parent's router."""

    def __init__(self, global_ids: list[int]):
        self.global_ids = global_ids
        self.events: list[tuple[bool, int, object]] = []  # (stored, global replica id, block hash)

    def on_blocks_stored(self, replica_id, block_hashes):
        gid = self.global_ids[replica_id]
        self.events.extend((True, gid, h) for h in block_hashes)

    def on_blocks_evicted(self, replica_id, block_hashes):
        gid = self.global_ids[replica_id]
        self.events.extend((False, gid, h) for h in block_hashes)


class _TakenOnce(dict):
    """The shard's pending requests for Simulator._loop, which reads each once, at its arrival."""

    __getitem__ = dict.pop


class _Shard:
    """A worker's replicas and the run in progress on them."""

    def __init__(self, config: SimConfig, profile: StepProfile, shard: int, shards: int, spread_seed: int):
        owned = len(range(shard, config.replicas, shards))
        self.simulator = simulator = Simulator(
            dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, replicas=owned)), profile,
            spread_seed)
        self.global_ids = [shard + shards * local for local in range(owned)]
        for replica, gid in zip(simulator.replicas, self.global_ids):
            replica.step_draws = step_stream(gid, spread_seed)  # the draws of the replica it stands for
        front = simulator.front
        self.reads_blocks = front.reads_blocks
        self.recorder = _BlockEvents(self.global_ids)
        front.router = self.recorder
        for replica in simulator.replicas:
            pool = replica.kv.pool
            del pool.cache  # FrontEnd's hook told the shard's own router: the parent's is told instead
            pool.on_evict = None
            if self.reads_blocks:
                front._watch(replica)

    def start(self, run_id: int, start: float, keep_token_times: bool, slo, lookups: tuple[set, set] | None) -> None:
        from punctual.sim.loadgen import SimSender, StreamedStats

        simulator = self.simulator
        simulator.now, simulator._run_id = start, run_id
        simulator.set_lookups(lookups)  # the blocks no prompt of the run looks up wait for catch-ups
        self.sender = SimSender(simulator, keep_token_times, slo)
        self.stats, self.records = StreamedStats(), []
        # Position -> request, taken out as it arrives: a shard holds only those not yet arrived
        # (its outcome holds a request in flight), not a million prompts to the run's end.
        self.requests, self.routes, self.admits = _TakenOnce(), [], []
        self.num_requests = 0
        self.in_flight = {}
        self.start_s, self.last_finish = start, start
        self._gc = _long_lived_objects_frozen()
        self._gc.__enter__()

    def _finish(self, outcome, now: float) -> None:
        outcome.finished = now
        self.last_finish = max(self.last_finish, now)
        self.records.append(self.sender._record(outcome, self.start_s, self.stats))

    def advance(self, arrivals: list[tuple], until: float | None) -> None:
        """Take the arrivals (each at its own time, on its replica) and run to `until` (None: the end)."""
        simulator = self.simulator
        for index, prompt, output_len, user, prompt_len, arrival, admit, local in arrivals:
            position = self.num_requests
            self.num_requests += 1
            self.requests[position] = SimRequest(index, prompt, output_len, user, prompt_len)
            self.routes.append(local)
            self.admits.append(admit)
            simulator._push(arrival, ARRIVAL, position)
        simulator._loop(self.requests, self.in_flight, self._finish, self.routes, self.admits.__getitem__,
                        simulator.profile.deliver_s, until)
        if until is not None and simulator.config.cluster.router != "round_robin":
            simulator._catch_up_visible(until)  # what the router reads at `until`, as before a decision

    def report(self) -> tuple[list[tuple], list[tuple]]:
        """The loads of the replicas that moved since the last report, and the block events since."""
        simulator, gids = self.simulator, self.global_ids
        changed = simulator.front.changed
        loads = [(gids[i], r.front_running, r.front_waiting, r.front_queued, r.kv_blocks_free())
                 for i in sorted(changed) for r in (simulator.replicas[i],)]
        changed.clear()
        events, self.recorder.events = self.recorder.events, []
        return loads, events

    def finish(self):
        simulator = self.simulator
        self._gc.__exit__(None, None, None)
        for outcome in list(self.in_flight.values()):  # nothing left to run them: a stuck scheduler
            outcome.error = "never finished: the scheduler stopped scheduling it"
            self._finish(outcome, simulator.now)
        self.in_flight.clear()
        self.records.sort(key=lambda r: r.index)
        return (self.records, self.stats, self.last_finish - self.start_s, simulator.now, simulator.num_events,
                simulator.num_steps)


def _worker(connection, config: SimConfig, profile: StepProfile, shard: int, shards: int, spread_seed: int) -> None:
    state = _Shard(config, profile, shard, shards, spread_seed)
    while True:
        command = connection.recv()
        if command is None:
            return
        try:
            kind = command[0]
            if kind == "start":
                state.start(*command[1:])
                answer = ("ok",)
            elif kind == "window":
                state.advance(command[1], command[2])
                answer = ("ok", *state.report())
            else:  # "finish"
                state.advance(command[1], None)
                answer = ("ok", state.report(), *state.finish())
        except BaseException:
            answer = ("error", traceback.format_exc())
        connection.send(answer)


def window_start(time: float, staleness_s: float) -> float:
    """The boundary of the window holding `time`: the last multiple of `staleness_s` at or before it
    (with 0, `time` itself: a window per arrival instant)."""
    if staleness_s <= 0:
        return time
    boundary = math.floor(time / staleness_s) * staleness_s
    if boundary > time:  # the division rounded up
        boundary -= staleness_s
    elif boundary + staleness_s <= time:  # or down
        boundary += staleness_s
    return boundary


class StaleRouterSimulator:
    """The Simulator's interface for SimSender (`run_shards`, `now`, `num_events`, `num_steps`)
    over `processes` shards, under the cluster's own router fed state `staleness_s` late."""

    def __init__(self, config: SimConfig, profile: StepProfile, processes: int, staleness_s: float,
                 spread_seed: int = 0):
        cluster = config.cluster
        cluster.validate()
        if cluster.prefill_replicas or cluster.migration:
            raise ValueError("--sim-processes: requests move between replicas (prefill/decode, --migration on); "
                             "run them in one process")
        if config.lora is not None:
            raise ValueError("--sim-processes: not with LoRA adapters (run them in one process)")
        if not staleness_s >= 0:
            raise ValueError(f"--sim-staleness-ms must be >= 0, got {staleness_s * 1000:g}")
        try:
            self.router = make_router(cluster.router, config.block_size, **config.router_options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--router: {exc}") from None
        processes = min(processes, config.replicas)
        self.config, self.profile, self.spread_seed = config, profile, spread_seed
        self.staleness_s = staleness_s
        self.num_shards = processes
        self.now = 0.0
        self.num_events = self.num_steps = 0
        self.num_windows = 0
        self.max_lateness_s = 0.0  # the oldest state a decision read, from its arrival (pipelined windows)
        self._run_id = 0
        total = config.num_kv_blocks
        # The router's view of each replica, as the shards last published it plus what it routed since.
        self._loads = [[0, 0, 0, total] for _ in range(config.replicas)]  # running, waiting, queued, free
        # Requests routed to a replica for later than the last report (not counted in it): waiting
        # there, with their prompt tokens queued, in the router's view.
        self._pending: dict[int, list[int]] = {}
        self._changed: set[int] = set(range(config.replicas))
        context = multiprocessing.get_context("fork")
        self._connections, self._processes = [], []
        for shard in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, config, profile, shard, processes, spread_seed),
                                      daemon=True)
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)

    def _exchange(self, commands: list[tuple]) -> list[tuple]:
        for connection, command in zip(self._connections, commands):
            connection.send(command)
        return self._answers()

    def _answers(self) -> list[tuple]:
        answers = []
        for connection in self._connections:
            answer = connection.recv()
            if answer[0] != "ok":
                raise RuntimeError(f"a simulator shard failed:\n{answer[1]}")
            answers.append(answer[1:])
        return answers

    def _take(self, answers: list[tuple]) -> None:
        """The shards' reports: loads replace the router's view, block events reach the router."""
        loads, changed, router = self._loads, self._changed, self.router
        stored, evicted = router.on_blocks_stored, router.on_blocks_evicted
        for shard_loads, events in answers:
            for gid, running, waiting, queued, free in shard_loads:
                loads[gid] = [running, waiting, queued, free]
                changed.add(gid)
            for is_stored, gid, block_hash in events:
                (stored if is_stored else evicted)(gid, [block_hash])

    def _route(self, prompt: tuple[int, ...], user: str | None) -> int:
        """FrontEnd.route on the published view; the request counts as queued there at once."""
        loads, pending, total = self._loads, self._pending, self.config.num_kv_blocks
        changed = []
        for gid in self._changed:
            running, waiting, queued, free = loads[gid]
            routed, tokens = pending.get(gid, (0, 0))
            changed.append(ReplicaLoad(gid, True, running, waiting + routed, queued + tokens, free, total))
        self._changed.clear()
        replica_id = self.router.route(prompt, user, changed, changed_only=True)
        self.router.on_request_routed(replica_id, len(prompt))
        self._add_pending([(replica_id, len(prompt))])
        return replica_id

    def _add_pending(self, routed) -> None:
        pending, changed = self._pending, self._changed
        for replica_id, tokens in routed:
            entry = pending.setdefault(replica_id, [0, 0])
            entry[0] += 1
            entry[1] += tokens
            changed.add(replica_id)

    def _reported(self, answers: list[tuple], uncounted=()) -> None:
        """Take the shards' reports; of the requests routed so far, only `uncounted` ((replica,
        prompt tokens) pairs) come after the reports' time, and still count as routed there."""
        self._changed.update(self._pending)
        self._pending = {}
        self._take(answers)
        self._add_pending(uncounted)

    def _admit_delays(self, count: int) -> list[float]:
        """Simulator._admit_delays, for this run's requests 0..count-1."""
        table = self.profile.admit_quantiles
        if table is None:
            return [self.profile.admit_s] * count
        return [draw(table, uniform(request_key(self._run_id, index, self.spread_seed))) for index in range(count)]

    def _route_window(self, requests, arrivals, admits, order, position: int, end: float,
                      outgoing: list[list[tuple]]) -> tuple[int, list[tuple[float, int, int]]]:
        """Route the arrivals from `position` on that come before `end` (at least one) into each
        shard's `outgoing`; returns the position after them, and (arrival, replica, prompt
        tokens) of each in order."""
        from punctual.sim.loadgen import token_ids

        shards, first = self.num_shards, position
        routes = []
        while position < len(order) and (position == first or arrivals[order[position]] < end):
            i = order[position]
            request = requests[i]
            prompt = token_ids(request.prompt)  # here, not all up front: a million prompts are gigabytes
            replica_id = self._route(prompt, request.user)
            routes.append((arrivals[i], replica_id, len(prompt)))
            outgoing[replica_id % shards].append((i, prompt, request.output_len, request.user, request.prompt_len,
                                                  arrivals[i], admits[i], replica_id // shards))
            position += 1
        return position, routes

    def _windows(self, requests, arrivals, admits, order) -> list[list[tuple]]:
        """Staleness 0: each arrival instant's arrivals routed on the state at that instant,
        exactly the one-process router's view; the shards wait while the router decides."""
        shards = self.num_shards
        outgoing: list[list[tuple]] = [[] for _ in range(shards)]
        position = 0
        while position < len(order):
            boundary = window_start(arrivals[order[position]], self.staleness_s)
            self._reported(self._exchange([("window", outgoing[s], boundary) for s in range(shards)]))
            self.num_windows += 1
            outgoing = [[] for _ in range(shards)]
            position, _ = self._route_window(requests, arrivals, admits, order, position,
                                             boundary + self.staleness_s, outgoing)
        return outgoing

    def _pipelined_windows(self, requests, arrivals, admits, order, start: float) -> list[list[tuple]]:
        """The router decides while the shards simulate. Windows are half the staleness long;
        the arrivals of window [b, b + w) are routed on the state at b - w, while the shards run
        on to b. The shards always hold the next window's command, so none waits for the router
        or for the other: the router waits only for the state it reads. A decision reads state
        between one and two windows (up to `staleness`) old, and which state it reads does not
        depend on the processes' timing: the answers are deterministic."""
        shards, width = self.num_shards, self.staleness_s / 2
        outgoing: list[list[tuple]] = [[] for _ in range(shards)]
        routed: deque = deque()  # (arrival, replica, prompt tokens) of the requests routed, not yet in a report
        issued: deque = deque()  # the targets of the commands not answered yet, in order
        last = held = start  # the last target sent; the time of the state the router holds

        def issue(target: float) -> None:
            nonlocal outgoing, last
            for connection, shard_outgoing in zip(self._connections, outgoing):
                connection.send(("window", shard_outgoing, target))
            outgoing = [[] for _ in range(shards)]
            issued.append(target)
            last = target

        position = 0
        while position < len(order):
            boundary = window_start(arrivals[order[position]], width)
            state_at = max(start, boundary - width)
            if state_at > last:  # arrivals are far apart: the state it reads is a target of its own
                issue(state_at)
            if boundary > last:  # the shards' next work, while the router decides
                issue(boundary)
            while held < state_at:
                held = issued.popleft()
                while routed and routed[0][0] < held:
                    routed.popleft()
                # The requests routed for `held` or later are not in the reports: still pending.
                self._reported(self._answers(), [(replica, tokens) for _, replica, tokens in routed])
                self.num_windows += 1
            position, routes = self._route_window(requests, arrivals, admits, order, position, boundary + width,
                                                  outgoing)
            self.max_lateness_s = max(self.max_lateness_s, routes[-1][0] - held)
            routed.extend(routes)
        for _ in issued:  # the answers not read yet, then the last window goes out with "finish"
            self._reported(self._answers())
            self.num_windows += 1
        return outgoing

    def run_shards(self, requests, offsets, concurrency, keep_token_times, slo):
        from punctual.sim.loadgen import token_ids

        if concurrency is not None:
            if concurrency < len(requests):
                raise ValueError("--sim-processes: a closed loop (--concurrency) couples the replicas; "
                                 "run it in one process")
            offsets = [0.0] * len(requests)  # every client sends at once and none sends again
        if len(offsets) != len(requests):
            raise ValueError(f"offsets: {len(offsets)} for {len(requests)} requests")
        self._run_id += 1
        admits = self._admit_delays(len(requests))
        start = self.now
        arrivals = [start + offset + admit for offset, admit in zip(offsets, admits)]
        order = sorted(range(len(requests)), key=lambda i: (arrivals[i], i))  # the one-process heap's order
        shards = self.num_shards
        # What the run's prompts look up, as the one-process Simulator tells its replicas
        # (Simulator._seal_unreachable_blocks); the prompts are made again at routing, one at a time.
        # Only for runs of repeated steps: planned step by step, the shards apply every op anyway.
        lookups = None
        if reads_blocks(self.router) and self.config.repeat_decode_steps:
            lookups = lookup_sets(((token_ids(r.prompt), None) for r in requests), self.config.block_size,
                                  self.router.hash_algo)
        self._exchange([("start", self._run_id, start, keep_token_times, slo, lookups)] * shards)
        if self.staleness_s > 0:
            outgoing = self._pipelined_windows(requests, arrivals, admits, order, start)
        else:
            outgoing = self._windows(requests, arrivals, admits, order)
        answers = self._exchange([("finish", outgoing[s]) for s in range(shards)])
        self._reported([answer[0] for answer in answers])  # the state the next run starts from
        return merge_shard_runs(self, answers)

    def close(self) -> None:
        close_shards(self._connections, self._processes)
