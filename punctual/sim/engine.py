"""The simulator's event loop in virtual time (after Vidur's): a heap of events, arrivals and
step completions per replica, popped in time order. Each replica runs the shipped scheduler;
a step lasts what the profile says its plan costs, and nothing the simulator itself computes
moves the clock.

Events at the same instant are all applied before any idle replica plans its next step, so a
burst that arrives together is scheduled together, as a server that drained its socket would.
"""
from __future__ import annotations

import gc
import heapq
from array import array
from bisect import bisect_left
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from punctual.cluster import migration as policy
from punctual.cluster.router import prompt_block_hashes
from punctual.config import ClusterConfig, SchedulerConfig
from punctual.request import EngineCoreRequest, Request, RequestStatus
from punctual.sampling_params import SamplingParams
from punctual.sim.lora import SimLoRA, sim_adapter
from punctual.sim.profile import StepProfile
from punctual.sim.replica import SYNTHETIC_TOKEN, SimReplica
from punctual.sim.routing import FrontEnd
from punctual.sim.spread import draw, request_key, uniform

STEP_DONE, ARRIVAL, MOVE = 0, 1, 2  # at one instant, steps end before new requests are taken in


@dataclass
class SimRequest:
    """One request as the load generator would send it: tokens in, a length to generate."""

    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    user: str | None = None
    prompt_len: int | None = None  # the workload's intended length (the record's prompt_len)
    adapter: int | None = None  # the LoRA adapter it runs under (sim/lora.py's sim_adapter index); None: the base model


@dataclass
class Outcome:
    """What the client would have seen of one request, in seconds from its send."""

    request: SimRequest
    sent: float  # virtual time of the send
    # Absolute virtual times of each token, as doubles: numpy reads them in one copy when the
    # request is recorded (a list's floats, scattered over the heap, are read one by one).
    token_times: array = field(default_factory=lambda: array("d"))
    finished: float | None = None
    error: str | None = None
    prompt_tokens: int = 0
    replica: int = -1
    core: EngineCoreRequest | None = None  # what the front end sent (a move re-creates the request from it)
    moved_s: float | None = None  # prefill/decode: when its KV reached the decode replica
    # The front end's view, as the cluster client keeps it (RoutedRequest): its first token came
    # back (running, no longer queued prefill); the prompt tokens it counts while queued; a move
    # of it is under way.
    started: bool = False
    queued_tokens: int = 0
    migrating: bool = False
    pd_moved: bool = False  # prefill/decode: its move to the decode pool was tried


@dataclass
class SimConfig:
    """What the simulator runs: each replica's engine settings (as `punctual serve` takes them),
    the cluster (the ClusterConfig that `punctual serve --replicas` takes: replicas, router,
    prefill/decode, migration), and the SLOs every request carries."""

    scheduler: SchedulerConfig
    num_kv_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ttft_slo_ms: float | None = None  # carried by every request, as the bench sends them
    tpot_slo_ms: float | None = None
    lora: SimLoRA | None = None  # LoRA slots, loaded set and their costs; None: no adapters
    # Price a replica's repeated decode steps in one go (Scheduler.repeatable_steps) instead of
    # planning each: the same answers (tests/sim/test_fast_path.py); False plans every step.
    # Off with LoRA (a run does not price adapter groups).
    repeat_decode_steps: bool = True
    # How the replicas and the router hash KV blocks. A block's hash only names its content here,
    # so Python's hash of the token tuple (kv.block_pool's "builtin": 64 bits, the same in every
    # process) gives the engine's answers unless two of a run's blocks collide, at a fraction of
    # SHA-256's cost (~7% of a 100-replica run). The engine's default stays SHA-256: it keeps a
    # tenant from crafting a block that poses as another's, which a simulation has no use for.
    hash_algo: str = "builtin"

    @property
    def replicas(self) -> int:
        return self.cluster.replicas

    @property
    def router_options(self) -> dict:
        """The cluster's router options, the router hashing blocks as the replicas do."""
        return {"hash_algo": self.hash_algo, **self.cluster.router_options}


def lookup_sets(prompts, block_size: int, algo: str) -> tuple[set, set]:
    """What a run's prompts look up in the prefix caches, from (prompt token ids, adapter index
    or None) pairs: every block hash of some prompt's lookup chain, and those some chain goes on
    from (SimReplica.lookup_hashes, lookup_parents). As ints (Python's hash of each block hash):
    a collision only seals less."""
    looked_up, parents = set(), set()
    for tokens, adapter in prompts:
        adapter_id = None if adapter is None else sim_adapter(adapter).adapter_id
        chain = [hash(h) for h in prompt_block_hashes(tokens, block_size, None, algo, adapter_id)
                 [:(len(tokens) - 1) // block_size]]
        looked_up.update(chain)
        parents.update(chain[:-1])
    return looked_up, parents


@contextmanager
def _long_lived_objects_frozen():
    """A run allocates millions of short-lived, acyclic objects (plans, updates, token lists)
    next to a large long-lived heap (the workload, requests in flight, their outcomes); the
    cyclic collector's passes kept walking that heap (~15-20% of a 200-replica run's CPU).
    Freeze what exists and collect the young generation less often; restored afterwards."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(threshold[0], 50_000), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


class Simulator:
    """A cluster of replicas in virtual time; state (prefix caches, the policies' cost models,
    the clock) carries over from one `run` to the next, as a server's does between bench runs."""

    def __init__(self, config: SimConfig, profile: StepProfile, spread_seed: int = 0):
        """`spread_seed`: which set of draws from the profile's spread (step ratios, admit delays)."""
        cluster = config.cluster
        cluster.validate()
        self.config = config
        self.profile = profile
        self.spread_seed = spread_seed
        self.replicas = [SimReplica(i, config.scheduler, config.num_kv_blocks, config.block_size, profile,
                                    config.enable_prefix_caching, config.max_model_len, spread_seed, config.lora,
                                    config.hash_algo)
                         for i in range(cluster.replicas)]
        for replica in self.replicas:
            if cluster.prefill_replicas:
                replica.role = "prefill" if replica.replica_id < cluster.prefill_replicas else "decode"
        # Arrivals go to the prefill pool when there is one, else anywhere.
        self.entry = self.replicas[:cluster.prefill_replicas] if cluster.prefill_replicas else self.replicas
        self.decode_pool = self.replicas[cluster.prefill_replicas:] if cluster.prefill_replicas else []
        if (self.decode_pool or cluster.migration) and profile.kv_transfer is None:
            raise ValueError("--prefill-replicas/--decode-replicas/--migration: the profile has no KV transfer cost "
                             "(calibrate it again, or derive one with --hardware)")
        self.front = FrontEnd(cluster.router, self.replicas, self.entry, config.block_size, config.router_options)
        self._visible: list = []  # (time, 0 end | 1 start, run's event seq, replica id): run ops the router sees
        self._allow_repeats()
        self.num_moves = self.num_moves_refused = 0
        self.moves: dict[str, int] = {}  # reason -> moves that landed (disaggregation, rebalance, priority)
        self.now = 0.0
        self.num_events = 0
        self._heap: list = []
        self._seq = 0
        self._run_id = 0
        self._params: dict[int, SamplingParams] = {}
        self._adapters: dict[int, object] = {}  # adapter index -> its LoRARequest (shared, as _params)
        self._rebalancing = False  # one rebalancing move at a time, as the cluster client
        self._move_reasons: dict[str, str] = {}  # request id -> why it is moving
        self._held: dict[str, list] = {}  # victim request id -> arrivals waiting for it to make room
        self._paused: tuple[float, dict] | None = None  # _loop(until=...): the instant it stopped in, its dirty replicas

    def _allow_repeats(self) -> None:
        """Runs of repeated steps only where nothing but the replica's own arrivals reads its
        scheduler between steps (no KV moves), and where the profile prices a step by its
        features alone (a subclass that prices plans itself sees every plan)."""
        cluster = self.config.cluster
        allowed = (self.config.repeat_decode_steps and not cluster.migration and not self.decode_pool
                   and self.config.lora is None
                   and type(self.profile).step_seconds is StepProfile.step_seconds)
        for replica in self.replicas:
            replica.repeat_steps = allowed
        self._router_reads_state = cluster.router != "round_robin"
        reads_blocks = self.front.reads_blocks
        for replica in self.replicas:
            replica.router_reads_blocks = reads_blocks

    def route(self, prompt_token_ids, user, adapter_id: str | None = None) -> int:
        """The replica the cluster's router picks for a request now."""
        return self.front.route(prompt_token_ids, user, adapter_id)

    def _admit_delays(self, requests: list[SimRequest]) -> Callable[[int], float]:
        """Each request's admit delay by its place in `requests`: the profile's admit_s, or with
        its spread a draw keyed by the run and the request's index (the same in any shard)."""
        table = self.profile.admit_quantiles
        if table is None:
            admit = self.profile.admit_s
            return lambda _: admit
        run_id, seed = self._run_id, self.spread_seed
        return [draw(table, uniform(request_key(run_id, r.index, seed))) for r in requests].__getitem__

    def _push(self, time: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, kind, self._seq, payload))

    def _sampling(self, output_len: int) -> SamplingParams:
        params = self._params.get(output_len)
        if params is None:  # shared between requests: the scheduler only reads them
            params = self._params[output_len] = SamplingParams(max_tokens=output_len, ignore_eos=True,
                                                               temperature=0.0)
        return params

    def _adapter(self, index: int | None):
        if index is None:
            return None
        if self.config.lora is None:
            raise ValueError("a request names a LoRA adapter, but the simulated cluster has no LoRA (SimConfig.lora)")
        adapter = self._adapters.get(index)
        if adapter is None:
            adapter = self._adapters[index] = sim_adapter(index)
        return adapter

    def set_profile(self, profile: StepProfile) -> None:
        """Price the next runs' steps with `profile` (between runs: nothing is in flight); the
        replicas' state carries over (`sim validate --rescale-per-point`: the machine's speed
        changed between two points, not its caches)."""
        if self._heap:
            raise RuntimeError("set_profile: events are pending; change the profile between runs")
        self.profile = profile
        for replica in self.replicas:
            replica.profile = profile
        self._allow_repeats()

    @property
    def num_steps(self) -> int:
        return sum(r.num_steps for r in self.replicas)

    def run(self, requests: list[SimRequest], offsets: list[float] | None = None, concurrency: int | None = None,
            on_finish: Callable[[Outcome], None] | None = None,
            routes: list[int] | None = None) -> tuple[list[Outcome] | None, float]:
        """Send `requests` open loop at `offsets` (seconds from now) or closed loop with
        `concurrency` clients; run until every one is answered. Returns the outcomes (None when
        `on_finish` consumes them as they finish) and the run's duration in virtual seconds.
        `routes`: each request's replica, decided outside (a shard of a split cluster)."""
        if (offsets is None) == (concurrency is None):
            raise ValueError("give offsets or concurrency")
        start = self.now
        self._run_id += 1
        outcomes: list[Outcome] | None = [] if on_finish is None else None
        in_flight: dict[str, Outcome] = {}
        pending: Iterator[int] = iter(range(len(requests)))
        last_finish = start

        # The front end's share (the profile's, from a serving run): a request reaches the
        # scheduler its admit delay after its send (admit_s, or its draw from the profile's
        # spread), and a token the client `deliver` (+ per stream sampled in it) after its step.
        admit_of, deliver = self._admit_delays(requests), self.profile.deliver_s
        if concurrency is not None:
            for _ in range(min(concurrency, len(requests))):
                i = next(pending)
                self._push(start + admit_of(i), ARRIVAL, i)
        else:
            if len(offsets) != len(requests):
                raise ValueError(f"offsets: {len(offsets)} for {len(requests)} requests")
            for i, offset in enumerate(offsets):
                self._push(start + offset + admit_of(i), ARRIVAL, i)

        def finish(outcome: Outcome, now: float) -> None:
            nonlocal last_finish
            outcome.finished = now
            last_finish = max(last_finish, now)
            if outcomes is not None:
                outcomes.append(outcome)
            else:
                on_finish(outcome)
            if concurrency is not None:
                following = next(pending, None)
                if following is not None:
                    self._push(now + admit_of(following), ARRIVAL, following)

        self._seal_unreachable_blocks(requests if routes is None else None)
        with _long_lived_objects_frozen():
            self._loop(requests, in_flight, finish, routes, admit_of, deliver)
        for request_id, outcome in list(in_flight.items()):  # nothing left to run them: a stuck scheduler
            outcome.error = "never finished: the scheduler stopped scheduling it"
            finish(outcome, self.now)
        return outcomes, last_finish - start

    def _seal_unreachable_blocks(self, requests: list[SimRequest] | None) -> None:
        """Tell each replica which block hashes this run's prompts look up and go on from
        (SimReplica.lookup_hashes, lookup_parents), so the blocks no routing decision can look up
        wait for its next catch-up; None (every block watched) unless the router here reads block
        events, runs of repeated steps are on, and the router and the replicas hash alike."""
        router = self.front.router
        sealing = (requests is not None and self._router_reads_state and self.front.reads_blocks
                   and self.replicas[0].repeat_steps
                   and all(r.kv.hash_algo == getattr(router, "hash_algo", None) for r in self.replicas))
        self.set_lookups(lookup_sets(((r.prompt_token_ids, r.adapter) for r in requests), self.config.block_size,
                                     router.hash_algo) if sealing else None)

    def set_lookups(self, lookups: tuple[set, set] | None) -> None:
        """A run's `lookup_sets` (None: every block may be looked up) for every replica; runs of
        repeated steps only (step by step, every op is applied as it happens anyway)."""
        looked_up, parents = lookups if lookups is not None and self.replicas[0].repeat_steps else (None, None)
        for replica in self.replicas:
            replica.lookup_hashes, replica.lookup_parents = looked_up, parents
        self.front.tell_untold()

    def _loop(self, requests: list[SimRequest], in_flight: dict[str, Outcome], finish: Callable,
              routes: list[int] | None, admit_of: Callable[[int], float], deliver: float,
              until: float | None = None) -> None:
        """Pop events in time order until none is left, or with `until`, pause at that instant
        once its step ends are applied and before anything is taken in or planned there (a shard
        of sim/stale.py: its router decides that instant's arrivals first); the next call goes
        on with that instant."""
        heap, replicas = self._heap, self.replicas
        config = self.config
        migration = config.cluster.migration
        disaggregated = bool(self.decode_pool)
        per_stream = self.profile.deliver_per_stream_s
        prefix = f"{self._run_id}-"
        self._in_flight, self._finish = in_flight, finish
        paused, self._paused = self._paused, None
        while heap or paused is not None:
            if paused is not None:  # the instant a pause left: its arrivals, then its planning
                now, dirty = paused
                paused = None
            else:
                now = heap[0][0]
                if until is not None and now > until:
                    break
                dirty: dict[int, SimReplica] = {}
            self.now = now
            while heap and heap[0][0] == now:
                if until is not None and now == until and heap[0][1] != STEP_DONE:
                    break
                _, kind, seq, payload = heapq.heappop(heap)
                self.num_events += 1
                if kind == STEP_DONE:
                    replica = replicas[payload]
                    if seq != replica.step_seq:
                        continue  # the end of a run that an arrival cut short: its step ends earlier
                    if replica.run is not None:
                        if len(replica.run_times) - 2 < replica.run.steps and replica.price_more():
                            self._push_step_end(replica.run_times[-1], replica)  # the run goes on
                            if not replica.visible_queued:
                                self._push_visible(replica)
                            continue
                        self._catch_up(replica, now, every=True)
                        self._end_run(replica)
                    delivered = now + deliver + per_stream * replica.step_sampled_rows
                    updates = replica.finish_step(now)
                    if updates:  # the front end sees an output update: a step, as the stream sees it
                        replica.step_s = policy.observe_step_gap(replica.step_s, replica.last_output_at, delivered)
                        replica.last_output_at = delivered
                    for request, _, finish_reason in updates:
                        outcome = in_flight[request.request_id]
                        outcome.token_times.append(delivered)
                        if finish_reason is not None:
                            del in_flight[request.request_id]
                            self._forget(outcome, replica)
                            finish(outcome, delivered)
                        elif not outcome.started:
                            self._started(outcome, replica)
                            if disaggregated and replica.role == "prefill" and not outcome.pd_moved:
                                outcome.pd_moved = True
                                self._to_decode(request.request_id, replica, now)
                    for move in replica.pending_moves:  # commands wait for the step to end, as in a core
                        self._stop_and_copy(*move, now, dirty)
                    replica.pending_moves.clear()
                    dirty[replica.replica_id] = replica
                    if migration and updates and not self._rebalancing:
                        self._maybe_rebalance(now)
                elif kind == MOVE:
                    stage, *move = payload
                    if stage == "round":
                        self._copy_round(*move, now)
                    elif stage == "wake":  # a held request was sent: its replica may start a step
                        dirty[move[0]] = replicas[move[0]]
                    elif stage == "stop":
                        source = replicas[move[1]]
                        if source.busy:
                            source.pending_moves.append(move)
                        else:
                            self._stop_and_copy(*move, now, dirty)
                    else:
                        self._commit(*move, in_flight, now, dirty)
                else:
                    sim_request = requests[payload]
                    request_id = prefix + str(sim_request.index)
                    admit = admit_of(payload)
                    lora = self._adapter(sim_request.adapter)
                    core = EngineCoreRequest(request_id, sim_request.prompt_token_ids,
                                             self._sampling(sim_request.output_len), arrival_time=now - admit,
                                             ttft_slo_ms=config.ttft_slo_ms, tpot_slo_ms=config.tpot_slo_ms,
                                             user=sim_request.user, lora_request=lora)
                    outcome = Outcome(sim_request, now - admit, prompt_tokens=len(sim_request.prompt_token_ids),
                                      core=core)
                    if routes is not None:
                        index = routes[payload]
                    else:
                        if self._router_reads_state:
                            self._catch_up_visible(now)
                        if lora is None:
                            index = self.front.route(sim_request.prompt_token_ids, sim_request.user)
                        else:
                            index = self.front.route(sim_request.prompt_token_ids, sim_request.user, lora.adapter_id)
                    replica = replicas[index]
                    outcome.replica = index
                    in_flight[request_id] = outcome
                    self._queue(outcome, replica)
                    room = self._room_move(outcome, index) if migration else None
                    if room is not None:  # held until the less important request is gone
                        self._held.setdefault(room[0], []).append(request_id)
                        self._start_move(room[0], index, room[1], "priority", now)
                        continue
                    self._send(outcome, replica, now)
                    dirty[index] = replica
            if until is not None and now == until:
                self._paused = (now, dirty)
                break
            for replica in dirty.values():
                if replica.busy:
                    continue
                end, rejected = replica.start_step(now)
                for request in rejected:
                    outcome = in_flight.pop(request.request_id)
                    self._forget(outcome, replica)
                    outcome.error = "rejected: the scheduler cannot meet this request's SLO"
                    finish(outcome, now + deliver)
                if end is not None:
                    self._push_step_end(end, replica)
                    if replica.run is not None:
                        replica.run_outcomes = [in_flight[i] for i in replica.run.request_ids]
                        replica.visible_queued = False
                        self._push_visible(replica)
        self._in_flight = self._finish = None

    def _push_step_end(self, end: float, replica: SimReplica) -> None:
        self._push(end, STEP_DONE, replica.replica_id)
        replica.step_seq = self._seq

    # ---- runs of repeated decode steps (punctual.sched.repeats) -------------------------------------
    # A replica in a run holds its scheduler where the run began; its ops (step ends, and the
    # starts that allocate) are applied when something reads it: before the router decides (those
    # whose blocks the router sees, and everything before them), when a request reaches it, and at
    # the run's end. The router sees each replica as it is at the decision, as step by step.
    def _catch_up(self, replica: SimReplica, now: float, every: bool = False) -> None:
        """Apply the replica's run ops that happened by `now` and deliver their steps' tokens as
        the STEP_DONE of each would have (a token for each request, nobody finished)."""
        ended = replica.catch_up(now, every)
        if not ended:
            return
        times, rows = replica.run_times, replica.step_sampled_rows
        deliver, per_stream = self.profile.deliver_s, self.profile.deliver_per_stream_s
        delivered = [times[step + 1] + deliver + per_stream * rows for step in ended]
        step_s, last_output_at = replica.step_s, replica.last_output_at
        for at in delivered:
            step_s, last_output_at = policy.observe_step_gap(step_s, last_output_at, at), at
        replica.step_s, replica.last_output_at = step_s, last_output_at
        replica.run_delivered.extend(delivered)  # read by nobody before the run stops (_end_run)
        replica.on_change(replica.replica_id)

    @staticmethod
    def _end_run(replica: SimReplica) -> float | None:
        """The run stops (SimReplica.end_run); its requests get the tokens it delivered."""
        delivered = replica.run_delivered
        if delivered:
            for outcome in replica.run_outcomes:
                outcome.token_times.extend(delivered)
        replica.run_delivered = array("d")
        return replica.end_run()

    def _push_visible(self, replica: SimReplica) -> None:
        """Queue the run's next op that the router would see (at its time: a step's end before
        an instant's arrivals, a start after them)."""
        run, ops = replica.run, replica.watched_ops
        position = bisect_left(ops, max(run.done, replica.told))
        if position == len(ops):
            return
        op = ops[position]
        times = replica.run_times
        if op < 2 * run.steps and op // 2 + 1 < len(times):  # priced (else queued once pricing reaches it)
            heapq.heappush(self._visible, (times[op // 2 + 1], op & 1, replica.run_serial, replica.replica_id, op))
            replica.visible_queued = True

    def _catch_up_visible(self, now: float) -> None:
        """Before a routing decision at `now`: every replica with an op the router sees by then
        applies its run up to `now`."""
        visible, replicas = self._visible, self.replicas
        while visible and (visible[0][0] < now or visible[0][0] == now and visible[0][1] == 0):
            _, _, serial, replica_id, _ = heapq.heappop(visible)
            replica = replicas[replica_id]
            run = replica.run
            if run is None or replica.run_serial != serial:
                continue  # that run is over
            replica.visible_queued = False
            # Every watched op of this replica up to now at once: one catch-up if any of them is
            # applied before a decision, else only the free block count of its allocations.
            due = replica.ops_by(now)
            ops, applied = replica.watched_ops, replica.apply_ops
            first = bisect_left(ops, max(run.done, replica.told))
            if any(ops[i] in applied for i in range(first, bisect_left(ops, due, first))):
                self._catch_up(replica, now)
            elif due > replica.told:
                replica.told = due
                replica.on_change(replica_id)
            self._push_visible(replica)

    def _cut_run(self, replica: SimReplica, now: float) -> None:
        """A request reaches a replica in a run: the run stops at the step in flight, and the
        replica plans its next step with the newcomer, as step by step."""
        self._catch_up(replica, now)
        end = self._end_run(replica)
        if end is None:  # its step ended at this instant: it plans after the instant's arrivals
            replica.step_seq = -1
            self._push(now, MOVE, ("wake", replica.replica_id))
        else:
            self._push_step_end(end, replica)

    # ---- the front end's count of each replica's requests (ClusterClient._loads) ---------------
    @staticmethod
    def _queue(outcome: Outcome, replica: SimReplica, delivered: int = 0) -> None:
        """Routed there, first token not back yet: waiting, its prompt (and tokens so far) queued."""
        outcome.started = False
        outcome.queued_tokens = outcome.prompt_tokens + delivered
        replica.front_waiting += 1
        replica.front_queued += outcome.queued_tokens
        replica.front_ids.add(outcome.core.request_id)
        replica.on_change(replica.replica_id)

    @staticmethod
    def _started(outcome: Outcome, replica: SimReplica) -> None:
        outcome.started = True
        replica.front_waiting -= 1
        replica.front_queued -= outcome.queued_tokens
        replica.front_running += 1
        replica.on_change(replica.replica_id)

    @staticmethod
    def _forget(outcome: Outcome, replica: SimReplica) -> None:
        if outcome.started:
            replica.front_running -= 1
        else:
            replica.front_waiting -= 1
            replica.front_queued -= outcome.queued_tokens
        replica.front_ids.discard(outcome.core.request_id)
        replica.on_change(replica.replica_id)

    def _send(self, outcome: Outcome, replica: SimReplica, now: float, core: EngineCoreRequest | None = None,
              num_output: int = 0) -> bool:
        """The replica's core takes the request (`core`: a resumed one, with `num_output` tokens
        already made); False when it answers 400 (the outcome is finished with the error)."""
        request = Request(core or outcome.core, replica.max_model_len)
        if replica.run is not None:
            self._cut_run(replica, now)
        try:
            replica.add_request(request, now)
        except ValueError as exc:  # the server would answer 400
            del self._in_flight[outcome.core.request_id]
            self._forget(outcome, replica)
            outcome.error = f"HTTP 400: {exc}"
            self._finish(outcome, now)
            return False
        return True

    # ---- moving a running request's KV (punctual.cluster.client.migrate) ------------------------
    # Reserve blocks on the target; pre-copy the full blocks computed so far while the request
    # goes on decoding at the source, again for those filled meanwhile (up to MAX_PRECOPY_ROUNDS,
    # until a round found STOP_AND_COPY_BLOCKS or fewer); then, between two of the source's steps,
    # stop it there and copy the rest; it decodes on at the target once that copy lands. A refused
    # reservation leaves it decoding at the source; a refused commit resumes it there by recompute.
    # Each copy round costs the profile's transfer time. Moves happen for prefill/decode (once a
    # request's first token exists), rebalancing and making room, decided by cluster/migration.py.
    def _to_decode(self, request_id: str, source: SimReplica, now: float) -> None:
        """Prefill/decode: to the decode replica where it goes on soonest (ClusterClient._to_decode)."""
        outcome = self._in_flight[request_id]
        num_tokens = outcome.prompt_tokens + len(outcome.token_times)
        decode = {r.replica_id for r in self.decode_pool}
        transfer_s = {rid: self._predicted_transfer_s(num_tokens) for rid in decode}
        target = policy.pick_decode(self.front.loads(), decode, transfer_s,
                                    policy.cluster_step_s([r.step_s for r in self.replicas]))
        if target is not None:
            self._start_move(request_id, source.replica_id, target, "disaggregation", now)

    def _predicted_transfer_s(self, num_tokens: int) -> float:
        block_size = self.config.block_size
        return self.profile.transfer_seconds(-(-num_tokens // block_size), block_size)

    def _maybe_rebalance(self, now: float) -> None:
        """ClusterClient._maybe_rebalance: the same policy on the same counts."""
        in_flight, replicas = self._in_flight, self.replicas

        def movable(source: int) -> dict[str, int]:
            return {i: in_flight[i].prompt_tokens + len(in_flight[i].token_times) for i in replicas[source].front_ids
                    if in_flight[i].started and not in_flight[i].migrating}

        def remaining(request_id: str) -> int:
            outcome = in_flight[request_id]
            return max(0, outcome.request.output_len - len(outcome.token_times))

        decision = policy.rebalance_move(
            self.front.loads({"decode"} if self.decode_pool else None), self.config.cluster.migration_threshold,
            movable, lambda source, target, tokens: self._predicted_transfer_s(tokens), remaining,
            lambda rid: replicas[rid].step_s)
        if decision is not None:
            request_id, source, target = decision
            self._rebalancing = True
            self._start_move(request_id, source, target, "rebalance", now)

    def _room_move(self, outcome: Outcome, replica_id: int) -> tuple[str, int] | None:
        """ClusterClient._room_move: a less important running request to move off first, or None."""
        in_flight = self._in_flight

        def seat(request_id: str) -> policy.Seat:
            other = in_flight[request_id]
            return policy.Seat(request_id, other.core.priority, self._blocks_needed(other),
                               other.started and not other.migrating)
        seats = {r.replica_id: [seat(i) for i in r.front_ids] for r in self.replicas}
        roles = {"decode"} if self.decode_pool else None
        return policy.room_move(outcome.core.priority, self._blocks_needed(outcome), replica_id, seats,
                                self.front.loads(roles))

    def _blocks_needed(self, outcome: Outcome) -> int:
        max_model_len = self.replicas[outcome.replica].max_model_len
        return policy.blocks_needed(outcome.prompt_tokens, outcome.request.output_len, max_model_len,
                                    self.config.block_size)

    def _start_move(self, request_id: str, source_id: int, target_id: int, reason: str, now: float) -> None:
        outcome = self._in_flight.get(request_id)
        if (outcome is None or outcome.migrating or not outcome.started or outcome.replica != source_id
                or source_id == target_id):
            self._move_done(request_id, reason, now)
            return
        target = self.replicas[target_id]
        block_size = self.config.block_size
        num_tokens = outcome.prompt_tokens + len(outcome.token_times)
        if not target.kv.reserve(request_id, -(-num_tokens // block_size)):
            self.num_moves_refused += 1
            self._move_done(request_id, reason, now)
            return
        target.on_change(target_id)
        outcome.migrating = True
        self._move_reasons[request_id] = reason
        self._precopy(request_id, source_id, target_id, 0, 0, now)

    def _precopy(self, request_id: str, source_id: int, target_id: int, copied: int, rounds: int,
                 now: float) -> None:
        """Pre-copy round `rounds + 1`: the full blocks computed since `copied`, or the stop-and-copy
        when there are none."""
        request = self.replicas[source_id].scheduler.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:  # finished or preempted: it stays
            self._refuse(request_id, target_id, now)
            return
        fresh = request.num_computed_tokens // self.config.block_size - copied
        if fresh > 0:
            self._push(now + self.profile.transfer_seconds(fresh, self.config.block_size), MOVE,
                       ("round", request_id, source_id, target_id, copied + fresh, rounds + 1, fresh))
        else:
            self._push(now, MOVE, ("stop", request_id, source_id, target_id, copied))

    def _copy_round(self, request_id: str, source_id: int, target_id: int, copied: int, rounds: int,
                    num_blocks: int, now: float) -> None:
        """A pre-copy round landed: another, or the stop-and-copy once a round was short or enough ran."""
        if num_blocks <= policy.STOP_AND_COPY_BLOCKS or rounds >= policy.MAX_PRECOPY_ROUNDS:
            self._push(now, MOVE, ("stop", request_id, source_id, target_id, copied))
        else:
            self._precopy(request_id, source_id, target_id, copied, rounds, now)

    def _refuse(self, request_id: str, target_id: int, now: float) -> None:
        target = self.replicas[target_id]
        target.kv.release_reservation(request_id)
        target.on_change(target_id)
        outcome = self._in_flight.get(request_id)
        if outcome is not None:
            outcome.migrating = False
        self.num_moves_refused += 1
        self._move_done(request_id, self._move_reasons.pop(request_id, ""), now)

    def _stop_and_copy(self, request_id: str, source_id: int, target_id: int, copied: int, now: float,
                       dirty: dict) -> None:
        source, target = self.replicas[source_id], self.replicas[target_id]
        request = source.scheduler.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:  # finished or preempted: it stays
            self._refuse(request_id, target_id, now)
            return
        state = (request.num_output_tokens, request.num_computed_tokens, request.num_preemptions)
        source.scheduler.detach(request_id, now)
        dirty[source_id] = source
        # The front end maps it to the target before the last copy (ClusterClient.migrate).
        outcome = self._in_flight[request_id]
        self._forget(outcome, source)
        outcome.replica = target_id
        outcome.started = True
        target.front_running += 1
        target.front_ids.add(request_id)
        target.on_change(target_id)
        block_size = self.config.block_size
        remaining = max(0, -(-request.num_computed_tokens // block_size) - copied)
        self._push(now + self.profile.transfer_seconds(remaining, block_size), MOVE,
                   ("commit", request_id, source_id, target_id, state))

    def _commit(self, request_id: str, source_id: int, target_id: int, state: tuple, in_flight: dict,
                now: float, dirty: dict) -> None:
        outcome = in_flight[request_id]
        outcome.migrating = False
        reason = self._move_reasons.pop(request_id, "")
        num_output, num_computed, num_preemptions = state
        target = self.replicas[target_id]
        request = Request(outcome.core, target.max_model_len)
        for _ in range(num_output):
            request.append_token(SYNTHETIC_TOKEN)
        request.num_preemptions = num_preemptions
        block_size = self.config.block_size
        if target.kv.reserve(request_id, -(-num_computed // block_size)):
            request.num_computed_tokens = num_computed
            if target.scheduler.add_running(request, now):
                outcome.moved_s = now
                self.num_moves += 1
                self.moves[reason] = self.moves.get(reason, 0) + 1
                dirty[target_id] = target
                self._move_done(request_id, reason, now)
                return
        target.kv.release_reservation(request_id)
        self.num_moves_refused += 1
        # Resumed by recompute of its prompt and tokens so far, at the source (ClusterClient._resume_by_recompute).
        self._forget(outcome, target)
        source = self.replicas[source_id]
        outcome.replica = source_id
        self._queue(outcome, source, num_output)
        request.num_computed_tokens = 0
        source.scheduler.add_request(request, now)
        dirty[source_id] = source
        self._move_done(request_id, reason, now)

    def _move_done(self, request_id: str, reason: str, now: float) -> None:
        """A move ended, landed or not: the next rebalancing may start; arrivals held for the room
        it was to make go to their replica now."""
        if reason == "rebalance":
            self._rebalancing = False
        for held_id in self._held.pop(request_id, ()):
            outcome = self._in_flight.get(held_id)
            if outcome is not None:
                replica = self.replicas[outcome.replica]
                if self._send(outcome, replica, now):
                    self._push(now, MOVE, ("wake", outcome.replica))
