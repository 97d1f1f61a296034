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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from punctual.config import SchedulerConfig
from punctual.request import EngineCoreRequest, Request, RequestStatus
from punctual.sampling_params import SamplingParams
from punctual.sim.profile import StepProfile
from punctual.sim.replica import SimReplica
from punctual.sim.routing import least_loaded, make_router
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


@dataclass
class Outcome:
    """What the client would have seen of one request, in seconds from its send."""

    request: SimRequest
    sent: float  # virtual time of the send
    token_times: list[float] = field(default_factory=list)  # absolute virtual times of each token
    finished: float | None = None
    error: str | None = None
    prompt_tokens: int = 0
    replica: int = -1
    core: EngineCoreRequest | None = None  # what the front end sent (a move re-creates the request from it)
    moved_s: float | None = None  # prefill/decode: when its KV reached the decode replica


@dataclass
class ClusterConfig:
    scheduler: SchedulerConfig
    num_kv_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    replicas: int = 1
    router: str = "round_robin"
    ttft_slo_ms: float | None = None  # carried by every request, as `punctual serve --ttft-slo-ms` sets
    tpot_slo_ms: float | None = None
    # Prefill/decode disaggregation (as `punctual serve --prefill-replicas P --decode-replicas D`):
    # replicas [0, P) take prompts; once a request's first token exists its KV moves to the least
    # loaded of [P, P + D) and it decodes there. 0, 0: colocated.
    prefill_replicas: int = 0
    decode_replicas: int = 0

    def __post_init__(self) -> None:
        if self.prefill_replicas or self.decode_replicas:
            if self.prefill_replicas < 1 or self.decode_replicas < 1:
                raise ValueError("--prefill-replicas and --decode-replicas must both be >= 1 when either is set, "
                                 f"got {self.prefill_replicas} and {self.decode_replicas}")
            self.replicas = self.prefill_replicas + self.decode_replicas


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

    def __init__(self, config: ClusterConfig, profile: StepProfile, spread_seed: int = 0):
        """`spread_seed`: which set of draws from the profile's spread (step ratios, admit delays)."""
        if config.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {config.replicas}")
        self.config = config
        self.profile = profile
        self.spread_seed = spread_seed
        self.replicas = [SimReplica(i, config.scheduler, config.num_kv_blocks, config.block_size, profile,
                                    config.enable_prefix_caching, config.max_model_len, spread_seed)
                         for i in range(config.replicas)]
        for replica in self.replicas:
            if config.prefill_replicas:
                replica.role = "prefill" if replica.replica_id < config.prefill_replicas else "decode"
        # Arrivals go to the prefill pool when there is one, else anywhere.
        self.entry = self.replicas[:config.prefill_replicas] if config.prefill_replicas else self.replicas
        self.decode_pool = self.replicas[config.prefill_replicas:] if config.prefill_replicas else []
        if self.decode_pool and profile.kv_transfer is None:
            raise ValueError("--prefill-replicas/--decode-replicas: the profile has no KV transfer cost "
                             "(calibrate it again, or derive one with --hardware)")
        self.route = make_router(config.router, self.entry, config.block_size)
        self.num_moves = self.num_moves_refused = 0
        self.now = 0.0
        self.num_events = 0
        self._heap: list = []
        self._seq = 0
        self._run_id = 0
        self._params: dict[int, SamplingParams] = {}

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

    def set_profile(self, profile: StepProfile) -> None:
        """Price the next runs' steps with `profile` (between runs: nothing is in flight); the
        replicas' state carries over (`sim validate --rescale-per-point`: the machine's speed
        changed between two points, not its caches)."""
        if self._heap:
            raise RuntimeError("set_profile: events are pending; change the profile between runs")
        self.profile = profile
        for replica in self.replicas:
            replica.profile = profile

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

        with _long_lived_objects_frozen():
            self._loop(requests, in_flight, finish, routes, admit_of, deliver)
        for request_id, outcome in list(in_flight.items()):  # nothing left to run them: a stuck scheduler
            outcome.error = "never finished: the scheduler stopped scheduling it"
            finish(outcome, self.now)
        return outcomes, last_finish - start

    def _loop(self, requests: list[SimRequest], in_flight: dict[str, Outcome], finish: Callable,
              routes: list[int] | None, admit_of: Callable[[int], float], deliver: float) -> None:
        """Pop events in time order until none is left."""
        heap, replicas = self._heap, self.replicas
        config = self.config
        per_stream = self.profile.deliver_per_stream_s
        prefix = f"{self._run_id}-"
        self._in_flight = in_flight
        while heap:
            now = heap[0][0]
            self.now = now
            dirty: dict[int, SimReplica] = {}
            while heap and heap[0][0] == now:
                _, kind, _, payload = heapq.heappop(heap)
                self.num_events += 1
                if kind == STEP_DONE:
                    replica = replicas[payload]
                    delivered = now + deliver + per_stream * replica.step_sampled_rows
                    prefill_pool = replica.role == "prefill"
                    for request, _, finish_reason in replica.finish_step(now):
                        if finish_reason is None:
                            outcome = in_flight[request.request_id]
                            outcome.token_times.append(delivered)
                            if prefill_pool and len(outcome.token_times) == 1:
                                self._start_move(request, replica, now)
                        else:
                            outcome = in_flight.pop(request.request_id)
                            outcome.token_times.append(delivered)
                            finish(outcome, delivered)
                    for move in replica.pending_moves:  # commands wait for the step to end, as in a core
                        self._stop_and_copy(*move, now, dirty)
                    replica.pending_moves.clear()
                    dirty[replica.replica_id] = replica
                elif kind == MOVE:
                    stage, *move = payload
                    if stage == "stop":
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
                    core = EngineCoreRequest(request_id, sim_request.prompt_token_ids,
                                             self._sampling(sim_request.output_len), arrival_time=now - admit,
                                             ttft_slo_ms=config.ttft_slo_ms, tpot_slo_ms=config.tpot_slo_ms,
                                             user=sim_request.user)
                    outcome = Outcome(sim_request, now - admit, prompt_tokens=len(sim_request.prompt_token_ids),
                                      core=core)
                    index = (self.route(sim_request.prompt_token_ids, sim_request.user, self.entry) if routes is None
                             else routes[payload])
                    replica = replicas[index]
                    outcome.replica = index
                    try:
                        replica.add_request(Request(core, replica.max_model_len), now)
                    except ValueError as exc:  # the server would answer 400
                        outcome.error = f"HTTP 400: {exc}"
                        finish(outcome, now)
                        continue
                    in_flight[request_id] = outcome
                    dirty[index] = replica
            for replica in dirty.values():
                if replica.busy:
                    continue
                duration, rejected = replica.start_step(now)
                for request in rejected:
                    outcome = in_flight.pop(request.request_id)
                    outcome.error = "rejected: the scheduler cannot meet this request's SLO"
                    finish(outcome, now + deliver)
                if duration is not None:
                    self._push(now + duration, STEP_DONE, replica.replica_id)
        self._in_flight = None

    # ---- prefill/decode: a request's KV moves once its first token exists ----------------------
    # As the cluster client does it (punctual.cluster.client.migrate): reserve blocks on the
    # least loaded decode replica; pre-copy the full blocks computed so far while the request
    # goes on decoding at the source; then, between two of the source's steps, stop it there and
    # copy the rest; it decodes on at the target once that copy lands. A refused reservation
    # leaves it decoding at the source; a refused commit resumes it there by recompute.
    def _start_move(self, request: Request, source: SimReplica, now: float) -> None:
        target = self.decode_pool[least_loaded(None, None, self.decode_pool)]
        block_size = self.config.block_size
        if not target.kv.reserve(request.request_id, -(-request.num_tokens // block_size)):
            self.num_moves_refused += 1
            return
        copied = request.num_computed_tokens // block_size
        self._push(now + self.profile.transfer_seconds(copied, block_size), MOVE,
                   ("stop", request.request_id, source.replica_id, target.replica_id, copied))

    def _stop_and_copy(self, request_id: str, source_id: int, target_id: int, copied: int, now: float,
                       dirty: dict) -> None:
        source, target = self.replicas[source_id], self.replicas[target_id]
        request = source.scheduler.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:  # finished or preempted: it stays
            target.kv.release_reservation(request_id)
            self.num_moves_refused += 1
            return
        state = (request.num_output_tokens, request.num_computed_tokens, request.num_preemptions)
        source.scheduler.detach(request_id, now)
        dirty[source_id] = source
        block_size = self.config.block_size
        remaining = max(0, -(-request.num_computed_tokens // block_size) - copied)
        self._push(now + self.profile.transfer_seconds(remaining, block_size), MOVE,
                   ("commit", request_id, source_id, target_id, state))

    def _commit(self, request_id: str, source_id: int, target_id: int, state: tuple, in_flight: dict,
                now: float, dirty: dict) -> None:
        from punctual.sim.replica import SYNTHETIC_TOKEN

        outcome = in_flight[request_id]
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
                outcome.replica, outcome.moved_s = target_id, now
                self.num_moves += 1
                dirty[target_id] = target
                return
        target.kv.release_reservation(request_id)
        self.num_moves_refused += 1
        source = self.replicas[source_id]  # resumed by recompute of its prompt and tokens so far
        request.num_computed_tokens = 0
        source.scheduler.add_request(request, now)
        dirty[source_id] = source
