"""Scheduling policies: which waiting request goes next, how much prefill a step may take,
who is turned away under overload, and which running request yields memory.

A policy only orders and chooses; it never touches blocks or tensors (the scheduler does).
All times are the scheduler's clock in seconds (monotonic in the engine, virtual in the simulator).
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Sequence

from punctual.config import SchedulerConfig
from punctual.request import Request
from punctual.sched.cost_model import StepCostModel
from punctual.sched.predictor import OutputLengthPredictor


class Admission(enum.Enum):
    ADMIT = "admit"
    SHED = "shed"  # turn the request away now (it cannot meet its SLO)


class SchedulingPolicy:
    """FCFS: first come, first served; preempt the newest arrival (it has the least work to lose)."""

    name = "fcfs"
    # The order key depends only on what a request arrived with (not on `now`, not on progress):
    # the scheduler keeps its running list in this order instead of sorting it every step.
    fixed_order = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "order_key" in vars(cls) and "fixed_order" not in vars(cls):
            cls.fixed_order = False  # a new key may read the clock or progress: sorted each step

    def __init__(self, config: SchedulerConfig, cost_model: StepCostModel):
        self.config = config
        self.cost_model = cost_model
        # Set by the scheduler: prompt tokens of a request already in the prefix cache (memoised
        # per step, so an order key costs O(1) however often the queue is sorted).
        self.cached_prefix_tokens: Callable[[Request], int] = lambda request: 0

    def order_key(self, request: Request, now: float) -> tuple:
        """Sort key of the waiting queue: smaller goes first."""
        return (request.arrival_time, request.request_id)

    def victim_key(self, request: Request, now: float) -> tuple:
        """The running request with the largest key is preempted first."""
        return self.order_key(request, now)

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        return max(candidates, key=lambda r: self.victim_key(r, now))

    def admit(self, request: Request, now: float) -> Admission:
        return Admission.ADMIT

    def prefill_budget(self, decodes: Sequence[Request], budget: int, now: float) -> int:
        """Tokens of prompt chunks this step may take after the decodes got theirs."""
        return budget

    def on_arrival(self, request: Request, now: float) -> None:
        pass

    def on_tokens(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        pass

    def on_finished(self, request: Request, now: float) -> None:
        pass


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` first, FCFS within a level; preempt the least important, newest request."""

    name = "priority"
    fixed_order = True  # (priority, arrival, id): all given at arrival

    def order_key(self, request: Request, now: float) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)


class SLOPolicy(SchedulingPolicy):
    """Deadline-aware: least TTFT slack first, prefill chunks sized to keep running decodes within
    their TPOT SLO, and requests that can no longer meet their TTFT turned away (or demoted to
    best effort) instead of pushing others past theirs. The goal is goodput, not throughput."""

    name = "slo"

    def ttft_deadline(self, request: Request) -> float:
        slo_ms = request.ttft_slo_ms or self.config.default_ttft_slo_ms
        return math.inf if slo_ms is None else request.arrival_time + slo_ms / 1000.0

    def predicted_prefill_s(self, request: Request) -> float:
        """Time to compute the request's uncached prompt, in chunks of the step budget."""
        todo = max(1, request.num_tokens - request.num_computed_tokens - self.cached_prefix_tokens(request))
        chunk = self.config.max_num_batched_tokens
        steps = math.ceil(todo / chunk)
        return steps * self.cost_model.predict(min(todo, chunk), 1)

    def order_key(self, request: Request, now: float) -> tuple:
        slack = self.ttft_deadline(request) - now - self.predicted_prefill_s(request)
        return (request.best_effort, request.priority, slack, request.arrival_time, request.request_id)

    def victim_key(self, request: Request, now: float) -> tuple:
        # Best effort and low priority go first; then the newest (least work lost).
        return (request.best_effort, request.priority, request.arrival_time, request.request_id)

    def admit(self, request: Request, now: float) -> Admission:
        if request.best_effort or request.num_output_tokens > 0:
            return Admission.ADMIT  # already demoted, or preempted mid-generation: TTFT is behind it
        if now + self.predicted_prefill_s(request) <= self.ttft_deadline(request):
            return Admission.ADMIT
        if self.config.slo_overload_action == "best_effort":
            request.best_effort = True
            return Admission.ADMIT
        return Admission.SHED

    def prefill_budget(self, decodes: Sequence[Request], budget: int, now: float) -> int:
        tpot_slos = [r.tpot_slo_ms or self.config.default_tpot_slo_ms for r in decodes]
        tpot_slos = [slo for slo in tpot_slos if slo is not None]
        if not tpot_slos:
            return budget
        step_tokens = self.cost_model.tokens_within(min(tpot_slos) / 1000.0, len(decodes) + 1)
        # Always some progress on prompts, or a full decode batch would starve every arrival.
        # (The scheduler fits speculated tokens within the same cap, after the prompts.)
        floor = min(budget, self.config.min_prefill_chunk)
        return max(floor, min(budget, step_tokens - len(decodes)))


class SJFPolicy(SchedulingPolicy):
    """Shortest predicted remaining work first, with aging so that nothing starves.

    Remaining work = uncached prompt tokens + predicted output tokens not yet generated; every
    second of waiting takes `sjf_aging_tokens_per_s` off a request's key.
    """

    name = "sjf"

    def __init__(self, config: SchedulerConfig, cost_model: StepCostModel):
        super().__init__(config, cost_model)
        self.predictor = OutputLengthPredictor()
        self._predicted: dict[str, float] = {}

    def predicted_output(self, request: Request) -> float:
        if request.request_id not in self._predicted:
            self._predicted[request.request_id] = self.predictor.predict(
                request.num_prompt_tokens, request.max_output_tokens, request.user)
        return self._predicted[request.request_id]

    def remaining_work(self, request: Request) -> float:
        prompt_left = max(0, request.num_prompt_tokens - request.num_computed_tokens
                          - self.cached_prefix_tokens(request))
        output_left = max(1.0, self.predicted_output(request) - request.num_output_tokens)
        return prompt_left + output_left

    def order_key(self, request: Request, now: float) -> tuple:
        waited = max(0.0, now - request.arrival_time)
        return (self.remaining_work(request) - self.config.sjf_aging_tokens_per_s * waited,
                request.arrival_time, request.request_id)

    def victim_key(self, request: Request, now: float) -> tuple:
        return (self.remaining_work(request), request.arrival_time, request.request_id)

    def on_finished(self, request: Request, now: float) -> None:
        predicted = self._predicted.pop(request.request_id, None)
        if request.num_output_tokens > 0:
            self.predictor.observe(request.num_prompt_tokens, request.num_output_tokens, request.user,
                                   predicted)


class FairPolicy(SchedulingPolicy):
    """Virtual Token Counter (VTC) across users: serve the user with the least weighted service.

    Service = prompt tokens x `fair_prompt_weight` + output tokens x `fair_output_weight`. A user
    who returns after being idle is lifted to the smallest counter among active users, so idle
    time is not banked. Within one quantum of service, a longer cached prefix goes first
    (deficit longest-prefix-match: locality without giving up the fairness bound).
    """

    name = "fair"

    def __init__(self, config: SchedulerConfig, cost_model: StepCostModel):
        super().__init__(config, cost_model)
        self.counters: dict[str, float] = {}
        self.active: dict[str, int] = {}  # user -> requests in the engine

    @staticmethod
    def user_of(request: Request) -> str:
        # The API key's tenant when the server knows it (the unit that pays), else the `user` field.
        return request.tenant or request.user or ""

    def order_key(self, request: Request, now: float) -> tuple:
        counter = self.counters.get(self.user_of(request), 0.0)
        quantum = self.config.fair_quantum_tokens
        return (math.floor(counter / quantum), -self.cached_prefix_tokens(request), request.arrival_time,
                request.request_id)

    def victim_key(self, request: Request, now: float) -> tuple:
        return (self.counters.get(self.user_of(request), 0.0), request.arrival_time, request.request_id)

    def on_arrival(self, request: Request, now: float) -> None:
        user = self.user_of(request)
        if self.active.get(user, 0) == 0:
            others = [self.counters.get(u, 0.0) for u, n in self.active.items() if n > 0 and u != user]
            floor = min(others) if others else self.counters.get(user, 0.0)
            self.counters[user] = max(self.counters.get(user, 0.0), floor)
        self.active[user] = self.active.get(user, 0) + 1

    def on_tokens(self, request: Request, num_prompt_tokens: int, num_output_tokens: int) -> None:
        user = self.user_of(request)
        self.counters[user] = (self.counters.get(user, 0.0) + self.config.fair_prompt_weight * num_prompt_tokens
                               + self.config.fair_output_weight * num_output_tokens)

    def on_finished(self, request: Request, now: float) -> None:
        user = self.user_of(request)
        self.active[user] = self.active.get(user, 1) - 1


POLICIES = {policy.name: policy for policy in (SchedulingPolicy, PriorityPolicy, SLOPolicy, SJFPolicy, FairPolicy)}


def make_policy(config: SchedulerConfig, cost_model: StepCostModel) -> SchedulingPolicy:
    name = config.scheduling_policy
    if name not in POLICIES:
        raise ValueError(f"scheduling_policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](config, cost_model)
