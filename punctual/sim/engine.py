"""The simulator's event loop in virtual time (after Vidur's): a heap of events, arrivals and
step completions per replica, popped in time order. Each replica runs the shipped scheduler;
a step lasts what the profile says its plan costs, and nothing the simulator itself computes
moves the clock.

Events at the same instant are all applied before any idle replica plans its next step, so a
burst that arrives together is scheduled together, as a server that drained its socket would.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Iterator

from punctual.config import SchedulerConfig
from punctual.request import EngineCoreRequest, Request
from punctual.sampling_params import SamplingParams
from punctual.sim.profile import StepProfile
from punctual.sim.replica import SimReplica
from punctual.sim.routing import make_router

STEP_DONE, ARRIVAL = 0, 1  # at one instant, steps end before new requests are taken in


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


class Simulator:
    """A cluster of replicas in virtual time; state (prefix caches, the policies' cost models,
    the clock) carries over from one `run` to the next, as a server's does between bench runs."""

    def __init__(self, config: ClusterConfig, profile: StepProfile):
        if config.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {config.replicas}")
        self.config = config
        self.profile = profile
        self.replicas = [SimReplica(i, config.scheduler, config.num_kv_blocks, config.block_size, profile,
                                    config.enable_prefix_caching, config.max_model_len)
                         for i in range(config.replicas)]
        self.route = make_router(config.router, self.replicas, config.block_size)
        self.now = 0.0
        self.num_events = 0
        self._heap: list = []
        self._seq = 0
        self._run_id = 0
        self._params: dict[int, SamplingParams] = {}

    def _push(self, time: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, kind, self._seq, payload))

    def _sampling(self, output_len: int) -> SamplingParams:
        params = self._params.get(output_len)
        if params is None:  # shared between requests: the scheduler only reads them
            params = self._params[output_len] = SamplingParams(max_tokens=output_len, ignore_eos=True,
                                                               temperature=0.0)
        return params

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
        prefix = f"{self._run_id}-"
        outcomes: list[Outcome] | None = [] if on_finish is None else None
        in_flight: dict[str, Outcome] = {}
        pending: Iterator[int] = iter(range(len(requests)))
        last_finish = start

        # The front end's share (the profile's, from a serving run): a request reaches the
        # scheduler `admit` after its send, and a token the client `deliver` after its step.
        admit, deliver = self.profile.admit_s, self.profile.deliver_s
        if concurrency is not None:
            for _ in range(min(concurrency, len(requests))):
                self._push(start + admit, ARRIVAL, next(pending))
        else:
            if len(offsets) != len(requests):
                raise ValueError(f"offsets: {len(offsets)} for {len(requests)} requests")
            for i, offset in enumerate(offsets):
                self._push(start + offset + admit, ARRIVAL, i)

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
                    self._push(now + admit, ARRIVAL, following)

        heap, replicas = self._heap, self.replicas
        config = self.config
        while heap:
            now = heap[0][0]
            self.now = now
            dirty: dict[int, SimReplica] = {}
            while heap and heap[0][0] == now:
                _, kind, _, payload = heapq.heappop(heap)
                self.num_events += 1
                if kind == STEP_DONE:
                    replica = replicas[payload]
                    delivered = now + deliver
                    for update in replica.finish_step(now):
                        if update.finish_reason is None:
                            in_flight[update.request.request_id].token_times.append(delivered)
                        else:
                            outcome = in_flight.pop(update.request.request_id)
                            outcome.token_times.append(delivered)
                            finish(outcome, delivered)
                    dirty[replica.replica_id] = replica
                else:
                    sim_request = requests[payload]
                    request_id = prefix + str(sim_request.index)
                    core = EngineCoreRequest(request_id, sim_request.prompt_token_ids,
                                             self._sampling(sim_request.output_len), arrival_time=now - admit,
                                             ttft_slo_ms=config.ttft_slo_ms, tpot_slo_ms=config.tpot_slo_ms,
                                             user=sim_request.user)
                    outcome = Outcome(sim_request, now - admit, prompt_tokens=len(sim_request.prompt_token_ids))
                    index = (self.route(sim_request.prompt_token_ids, sim_request.user, replicas) if routes is None
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
        for request_id, outcome in list(in_flight.items()):  # nothing left to run them: a stuck scheduler
            outcome.error = "never finished: the scheduler stopped scheduling it"
            finish(outcome, self.now)
        return outcomes, last_finish - start
