"""The scheduler's mechanism: one token budget per step, decodes first, prefill chunks fill the rest.

Every running decode gets its token before any prompt is prefilled, and prompts are cut into
chunks that fit what is left of the budget, so a long prompt never pauses running streams
(Sarathi-Serve's stall-free batching). When KV blocks run out, the policy's victim is
preempted: its blocks are freed and it is recomputed later from its prompt and the tokens it
already produced, so its output is unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from punctual.config import SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.request import Request, RequestStatus
from punctual.sched.cost_model import StepCostModel
from punctual.sched.policies import Admission, make_policy


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start_position: int  # num_computed_tokens when the step was planned
    block_table: list[int]
    # Proposed tokens verified in this step, fed after the request's last token (speculative decoding).
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so its last logits are sampled."""
        return self.start_position + self.num_new_tokens - len(self.spec_token_ids) == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    rejected: list[Request] = field(default_factory=list)  # shed by the policy: finished, never run

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_sampled_rows(self) -> int:
        """Positions whose logits the step computes: the last of each sampling chunk, and every
        verified position."""
        return sum(1 + len(s.spec_token_ids) for s in self.scheduled if s.samples)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.rejected


@dataclass
class FinishedUpdate:
    request: Request
    new_token_ids: list[int]
    finish_reason: str | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        self.config = config
        self.kv = kv_manager
        self.cost_model = StepCostModel()
        self.policy = make_policy(config, self.cost_model)
        self.policy.cached_prefix_tokens = self._cached_prefix_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def _cached_prefix_tokens(self, request: Request) -> int:
        if request.num_computed_tokens:
            return 0
        return len(self.kv.computed_prefix(request)) * self.kv.block_size

    # ---- intake -------------------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        """The most tokens one request can hold: the whole pool."""
        return self.kv.num_blocks * self.kv.block_size

    def add_request(self, request: Request, now: float | None = None) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        if request.num_prompt_tokens + 1 > self.max_request_tokens:
            raise ValueError(
                f"prompt of {request.num_prompt_tokens} tokens does not fit the KV cache "
                f"({self.max_request_tokens} tokens)")
        # A request alone must always fit, or it would preempt itself forever.
        request.max_output_tokens = min(request.max_output_tokens,
                                        self.max_request_tokens - request.num_prompt_tokens)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.policy.on_arrival(request, time.monotonic() if now is None else now)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def prompt_tokens_next_step(self, now: float) -> int:
        """Prompt-chunk tokens the next step would take if every decode took one token: what is
        left of running prompts and of the waiting ones that have a seat, within the budget and
        the policy's cap. The speculator leaves this much of the budget to prompts."""
        decodes = [r for r in self.running if not r.is_prefilling]
        budget = max(0, self.config.max_num_batched_tokens - len(decodes))
        budget = min(budget, self.policy.prefill_budget(decodes, budget, now))
        wanted = sum(r.num_tokens - r.num_computed_tokens for r in self.running if r.is_prefilling)
        seats = self.config.max_num_seqs - len(self.running)
        for request in self.waiting[:max(0, seats)]:
            if wanted >= budget:
                break
            wanted += max(1, request.num_tokens - self._cached_prefix_tokens(request))
        return min(budget, wanted)

    # ---- planning -----------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        now = time.monotonic() if now is None else now
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        policy = self.policy

        # Decodes first: a stalled decode costs TPOT for every running stream.
        decodes = sorted((r for r in self.running if not r.is_prefilling), key=lambda r: policy.order_key(r, now))
        for request in decodes:
            if budget == 0:
                break
            # Speculated tokens ride along when the budget allows and they cannot overshoot max_tokens.
            room = min(budget - 1, request.max_output_tokens - request.num_output_tokens - 1)
            spec = request.spec_token_ids[:max(0, room)]
            if request.status is RequestStatus.RUNNING and self._allocate_or_preempt(
                    request, 1 + len(spec), scheduled_ids, out, now):
                out.scheduled.append(self._plan(request, 1 + len(spec), spec))
                scheduled_ids.add(request.request_id)
                budget -= 1 + len(spec)

        # Prompt chunks fill what is left, within the policy's cap (e.g. to keep decodes in their TPOT SLO).
        running_decodes = [s.request for s in out.scheduled]
        budget = min(budget, policy.prefill_budget(running_decodes, budget, now))
        partial = sorted((r for r in self.running if r.is_prefilling), key=lambda r: policy.order_key(r, now))
        for request in partial:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, num_new, scheduled_ids, out, now):
                out.scheduled.append(self._plan(request, num_new))
                scheduled_ids.add(request.request_id)
                budget -= num_new

        self._shed(now, out)
        # Admit waiting requests only when nothing had to yield memory in this step.
        if not out.preempted and self.waiting:
            self.waiting.sort(key=lambda r: policy.order_key(r, now))
            admitted: list[Request] = []
            for request in self.waiting:
                if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                cached_blocks = self.kv.computed_prefix(request)
                if self.kv.first_pending_owner(request, len(cached_blocks)) is not None:
                    continue  # its next blocks are being computed by another request: reuse them, later
                num_cached = len(cached_blocks) * self.kv.block_size
                num_new = min(request.num_tokens - num_cached, budget)
                if not self.kv.allocate(request, num_cached + num_new, cached_blocks):
                    break  # head of line waits for memory; no overtaking keeps the policy's order
                request.num_computed_tokens = num_cached
                request.num_cached_tokens = num_cached
                request.status = RequestStatus.RUNNING
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
                self.running.append(request)
                out.scheduled.append(self._plan(request, num_new))
                budget -= num_new
                admitted.append(request)
            if admitted:
                taken = {id(r) for r in admitted}
                self.waiting = [r for r in self.waiting if id(r) not in taken]
        return out

    def _shed(self, now: float, out: SchedulerOutput) -> None:
        """Turn away waiting requests the policy says can no longer be served within their SLO."""
        shed = [r for r in self.waiting if self.policy.admit(r, now) is Admission.SHED]
        for request in shed:
            self._finish(request, RequestStatus.FINISHED_REJECTED, now)
            out.rejected.append(request)

    def record_step_time(self, plan: SchedulerOutput, seconds: float) -> None:
        """Feed the measured duration of an executed plan to the cost model the policies use."""
        self.cost_model.observe(plan.num_batched_tokens, len(plan.scheduled), seconds, plan.num_sampled_rows)

    def _plan(self, request: Request, num_new: int, spec: list[int] | None = None) -> ScheduledRequest:
        return ScheduledRequest(request, num_new, request.num_computed_tokens,
                                self.kv.block_table(request.request_id), spec or [])

    def _allocate_or_preempt(self, request: Request, num_new: int, scheduled_ids: set[str],
                             out: SchedulerOutput, now: float) -> bool:
        while not self.kv.allocate(request, request.num_computed_tokens + num_new):
            candidates = [r for r in self.running if r.request_id not in scheduled_ids]
            # Bound preemptions per request so nothing thrashes: spare the often-preempted if possible.
            spared = [r for r in candidates if r.num_preemptions < self.config.max_preemptions_per_request]
            victim = self.policy.pick_victim(spared or candidates, now)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        # Recompute later; its full blocks stay in the prefix cache, so the recompute is often a hit.
        self.kv.free(request)
        self.running.remove(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    # ---- results ------------------------------------------------------------------------
    def update_from_output(self, plan: SchedulerOutput, sampled: dict[str, list[int]],
                           now: float | None = None) -> list[FinishedUpdate]:
        """Advance computed counts, append sampled tokens, retire finished requests.

        A speculative step returns the accepted proposals plus one token; the KV written for the
        rejected ones lies beyond num_computed_tokens and is overwritten later (the rollback).
        """
        now = time.monotonic() if now is None else now
        updates = []
        for item in plan.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue
            tokens = sampled.get(request.request_id, [])
            accepted = max(0, len(tokens) - 1) if item.spec_token_ids else 0
            request.num_computed_tokens += item.num_new_tokens - len(item.spec_token_ids) + accepted
            self.kv.cache_full_blocks(request)
            is_decode = item.num_new_tokens - len(item.spec_token_ids) == 1 and request.num_output_tokens > 0
            self.policy.on_tokens(request, 0 if is_decode else item.num_new_tokens - len(item.spec_token_ids),
                                  len(tokens))
            if not tokens:
                continue
            finish_reason, kept = None, []
            for token_id in tokens:
                kept.append(token_id)
                finish_reason = request.append_token(token_id)
                if finish_reason is not None:
                    self._finish(request, RequestStatus(finish_reason), now)
                    break
            updates.append(FinishedUpdate(request, kept, finish_reason))
        return updates

    def finish_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                        ) -> list[Request]:
        """Remove requests (abort, or a stop string the front end saw) and free their blocks."""
        done = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            self._finish(request, status, time.monotonic())
            done.append(request)
        return done

    def _finish(self, request: Request, status: RequestStatus, now: float) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.finished_time = now
        self.kv.free(request)
        del self.requests[request.request_id]
        self.policy.on_finished(request, now)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        assert len(self.running) + len(self.waiting) == len(self.requests)
        assert all(r.status is RequestStatus.RUNNING for r in self.running)
        assert all(r.request_id not in self.kv.block_tables for r in self.waiting)
        assert len(self.running) <= self.config.max_num_seqs
