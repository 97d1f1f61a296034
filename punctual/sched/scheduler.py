"""The scheduler's mechanism: one token budget per step, decodes first, prefill chunks fill the rest.

Every running decode gets its token before any prompt is prefilled, and prompts are cut into
chunks that fit what is left of the budget, so a long prompt never pauses running streams
(Sarathi-Serve's stall-free batching). When KV blocks run out, the policy's victim is
preempted: its blocks are freed and it is recomputed later from its prompt and the tokens it
already produced, so its output is unchanged.
"""
from __future__ import annotations

from bisect import insort
from typing import Callable, Sequence

from punctual.config import SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.plan import ModelRunnerOutput, NewRequestData, ScheduledRequest, SchedulerOutput, StepPlan
from punctual.request import Request, RequestStatus
from punctual.sched.cost_model import StepCostModel
from punctual.sched.policies import Admission, SchedulingPolicy, make_policy
from punctual.validation import PromptLimits, check_prompt

__all__ = ["FinishedUpdate", "ScheduledRequest", "Scheduler", "SchedulerOutput", "StepPlan"]

# How many proposed tokens to verify per request, given what each decoding request has available
# (request id -> most tokens), the step's decodes, its prompt tokens and the room left in the
# budget: request id -> tokens. The speculator's length policy (SmartSpec's criterion).
SpecLengthChooser = Callable[[dict[str, int], int, int, int], dict[str, int]]


# One request's result of a step: (request, its new token ids, why it finished or None). A
# plain tuple: one is built per running request per step, and a tuple costs a fraction of an
# object with named fields in CPython; readers unpack it.
FinishedUpdate = tuple[Request, Sequence[int], "str | None"]


class Scheduler:
    """Plans each step; every time enters as an argument (`now`), so the simulator drives it in
    virtual time. Reads no clock and imports no torch."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, limits: PromptLimits | None = None,
                 spec_lengths: SpecLengthChooser | None = None, max_loras: int | None = None):
        """`max_loras`: LoRA adapter slots (distinct adapters among running requests); None: no LoRA."""
        self.config = config
        self.kv = kv_manager
        self.limits = limits
        self.spec_lengths = spec_lengths
        self.cost_model = StepCostModel()
        self.policy = make_policy(config, self.cost_model)
        self.policy.cached_prefix_tokens = self._cached_prefix_tokens
        self.waiting: list[Request] = []
        # Under a policy whose order never changes (`fixed_order`: fcfs, priority), kept in that
        # order, so a step walks it instead of sorting it (order keys are unique: the request id
        # is in each). Otherwise in admission order, sorted each step.
        self.running: list[Request] = []
        self._fixed_order = self.policy.fixed_order
        self._may_shed = type(self.policy).admit is not SchedulingPolicy.admit  # the base admits everyone
        # The base class's prefill cap is the whole budget, whatever the step's decodes.
        self._reads_decodes = type(self.policy).prefill_budget is not SchedulingPolicy.prefill_budget
        # The policy's on_tokens, unless it is the base class's no-op (a call per request per step).
        self._on_tokens = None if type(self.policy).on_tokens is SchedulingPolicy.on_tokens else self.policy.on_tokens
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Requests the runner must forget with the next plan (finished, aborted, preempted).
        self._finished_ids: list[str] = []
        # How many of a running request's blocks the runner has been told about.
        self._blocks_sent: dict[str, int] = {}
        # Cached-prefix lengths looked up during one schedule() call: order keys read them many
        # times per step (sorting, shedding), and each lookup walks a hash chain.
        self._prefix_memo: dict[str, int] = {}
        # LoRA slots (S-LoRA's active set): at most max_loras distinct adapters run at once; a
        # request whose adapter finds no slot waits. Held adapters, least recently taken first:
        # a freed slot keeps its adapter until another needs it (a swap).
        self.max_loras = max_loras
        self.lora_slots: list[int] = []
        self.lora_running: dict[int, int] = {}  # adapter -> running requests under it
        self.num_lora_swaps = 0

    def _cached_prefix_tokens(self, request: Request) -> int:
        if request.num_computed_tokens:
            return 0
        cached = self._prefix_memo.get(request.request_id)
        if cached is None:
            cached = self._prefix_memo[request.request_id] = len(self.kv.computed_prefix(request)) * self.kv.block_size
        return cached

    # ---- intake -------------------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        """The most tokens one request can hold: the whole pool."""
        return self.kv.num_blocks * self.kv.block_size

    @property
    def prompt_limits(self) -> PromptLimits:
        limits = self.limits or PromptLimits(None, None)
        return PromptLimits(limits.vocab_size, limits.max_model_len, self.max_request_tokens)

    def add_request(self, request: Request, now: float) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        check_prompt(request.prompt_token_ids, self.prompt_limits)
        self._fit_output(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.policy.on_arrival(request, now)

    @property
    def pending_finished_ids(self) -> list[str]:
        """Requests the next plan will tell the runner to forget."""
        return self._finished_ids

    def _fit_output(self, request: Request) -> None:
        # A request alone must always fit, or it would preempt itself forever.
        request.max_output_tokens = min(request.max_output_tokens,
                                        self.max_request_tokens - request.num_prompt_tokens)

    def add_running(self, request: Request, now: float) -> bool:
        """Take a request whose KV arrived from another engine: it already holds a block table
        covering `num_computed_tokens` and goes on decoding here. False if no seat is free."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        if len(self.running) >= self.config.max_num_seqs or not self._has_slot(request.adapter):
            return False
        table = self.kv.block_tables.get(request.request_id)
        assert table is not None and len(table) * self.kv.block_size >= request.num_computed_tokens
        self._fit_output(request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        self.requests[request.request_id] = request
        self._add_running(request, now)
        self.policy.on_arrival(request, now)
        return True

    def _has_slot(self, adapter: int | None) -> bool:
        """Whether a request of `adapter` may run now: the base model always may."""
        return (adapter is None or adapter in self.lora_running
                or self.max_loras is not None and len(self.lora_running) < self.max_loras)

    def _take_slot(self, adapter: int) -> None:
        running = self.lora_running.get(adapter, 0)
        self.lora_running[adapter] = running + 1
        if running:
            return
        slots = self.lora_slots
        if adapter in slots:  # still held since its last request: no swap
            slots.remove(adapter)
        elif len(slots) >= self.max_loras:
            idle = next(a for a in slots if a not in self.lora_running)  # _has_slot guarantees one
            slots.remove(idle)
            self.num_lora_swaps += 1
        slots.append(adapter)

    def _leave_running(self, request: Request) -> None:
        self.running.remove(request)
        adapter = request.adapter
        if adapter is not None:
            left = self.lora_running[adapter] - 1
            if left:
                self.lora_running[adapter] = left
            else:
                del self.lora_running[adapter]

    def lora_waiting_for_slot(self) -> dict[str, int]:
        """Adapter name -> waiting requests whose adapter has no slot now (O(waiting): for stats)."""
        blocked: dict[str, int] = {}
        for request in self.waiting:
            if request.lora_request is not None and not self._has_slot(request.adapter):
                name = request.lora_request.lora_name
                blocked[name] = blocked.get(name, 0) + 1
        return blocked

    def lora_running_by_name(self) -> dict[str, int]:
        """Adapter name -> running requests under it (O(running): for stats)."""
        running: dict[str, int] = {}
        for request in self.running:
            if request.lora_request is not None:
                name = request.lora_request.lora_name
                running[name] = running.get(name, 0) + 1
        return running

    def _add_running(self, request: Request, now: float) -> None:
        if request.adapter is not None:
            self._take_slot(request.adapter)
        if self._fixed_order:
            key = self.policy.order_key
            insort(self.running, request, key=lambda r: key(r, now))
        else:
            self.running.append(request)

    def detach(self, request_id: str, now: float) -> Request | None:
        """Let a request go to another engine: it leaves with no output; its blocks are freed
        (their KV must have been read first)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, RequestStatus.MIGRATED, now)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- planning -----------------------------------------------------------------------
    def schedule(self, now: float, spec_available: dict[str, int] | None = None) -> StepPlan:
        """Plan one step at time `now`. `spec_available`: request id -> proposal tokens its
        proposer can offer (speculative decoding); the lengths are chosen here, from the budget
        that decodes and prompt chunks leave, and the plan reserves room for them."""
        self._prefix_memo.clear()
        plan = StepPlan(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        policy = self.policy

        # Decodes first: a stalled decode costs TPOT for every running stream.
        if self._fixed_order:
            # Already in the policy's order: decodes and prompt chunks are told apart in the
            # decode pass itself (a copy: a preemption below leaves the running list).
            decodes, partial = self.running[:], []
        else:
            decodes, partial = [], []  # one pass: is_prefilling, inlined
            for request in self.running:
                (partial if len(request.token_ids) - request.num_computed_tokens > 1 else decodes).append(request)
            decodes.sort(key=lambda r: policy.order_key(r, now))
            partial.sort(key=lambda r: policy.order_key(r, now))
        tables, block_size, running = self.kv.block_tables, self.kv.block_size, RequestStatus.RUNNING
        scheduled = plan.scheduled
        # Without speculation a decode's table is final once it is scheduled, so the runner is
        # told of its new blocks here (with speculation, after the proposals' room is reserved).
        blocks_sent = self._blocks_sent
        attach_now = not spec_available
        running_decodes = []  # for the policy's prefill cap, if it reads them
        collect_decodes = self._reads_decodes
        for request in decodes:
            if request.status is not running:
                continue  # preempted earlier in this step
            start = request.num_computed_tokens
            token_ids = request.token_ids
            last = len(token_ids) - 1
            if last > start:
                partial.append(request)  # more than its next token to compute: a prompt chunk
                continue
            if budget == 0:
                continue  # no room for more decodes; the pass goes on only to find prompt chunks
            request_id = request.request_id
            table = tables[request_id]  # grown in place by an allocation
            # The common case first: its next token fits in the blocks it holds.
            if start < len(table) * block_size or self._allocate_or_preempt(request, 1, plan, now):
                if start == last:  # its newest token: sampled; a decode once it has generated
                    item = ScheduledRequest(request_id, [token_ids[start]], start, (), True,
                                            request.num_output_tokens > 0)
                else:  # every token computed (its sampled token never came): an empty chunk
                    item = ScheduledRequest(request_id, [], start, (), False, False)
                scheduled.append(item)
                if attach_now and blocks_sent.get(request_id) != len(table):
                    self._attach_blocks(item)
                if collect_decodes:
                    running_decodes.append(request)
                budget -= 1
        num_decodes = len(scheduled)

        # Prompt chunks fill what is left, within the policy's cap (e.g. to keep decodes in their
        # TPOT SLO); the cap covers speculated tokens too, since they also lengthen the step.
        cap = min(budget, policy.prefill_budget(running_decodes, budget, now))
        prompt_budget = cap
        for request in partial:  # a request preempted above is skipped by its status
            if prompt_budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = min(request.num_tokens - request.num_computed_tokens, prompt_budget)
            if self._allocate_or_preempt(request, num_new, plan, now):
                plan.scheduled.append(self._plan(request, num_new))
                prompt_budget -= num_new

        self._shed(now, plan)
        # Admit waiting requests only when nothing had to yield memory in this step.
        if not plan.preempted and self.waiting:
            prompt_budget = self._admit(prompt_budget, plan, now)
        budget -= cap - prompt_budget

        if spec_available:
            self._reserve_speculation(plan.scheduled[:num_decodes], spec_available, num_decodes,
                                      prompt_budget, budget, plan)
        for item in plan.scheduled[num_decodes if attach_now else 0:]:
            if blocks_sent.get(item.request_id) != len(tables[item.request_id]):  # else nothing new to send
                self._attach_blocks(item)
        return plan

    def _admit(self, budget: int, plan: StepPlan, now: float) -> int:
        self.waiting.sort(key=lambda r: self.policy.order_key(r, now))
        admitted: list[Request] = []
        for request in self.waiting:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request.lora_request is not None and not self._has_slot(request.adapter):
                continue  # every slot runs another adapter: wait for one to empty (others may go first)
            cached_blocks = self.kv.computed_prefix(request)  # fresh: earlier admissions may have evicted
            if self.kv.first_pending_owner(request, len(cached_blocks)) is not None:
                continue  # its next blocks are being computed by another request: reuse them, later
            num_cached = len(cached_blocks) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request, num_cached + num_new, cached_blocks):
                break  # head of line waits for memory; no overtaking keeps the policy's order
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                # What the prompt found cached (usage.cached_tokens): at first admission only, not
                # the blocks a preempted request finds again of its own.
                request.num_cached_tokens = num_cached
            self._add_running(request, now)
            plan.scheduled.append(self._plan(request, num_new))
            budget -= num_new
            admitted.append(request)
        if admitted:
            taken = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in taken]
        return budget

    def _reserve_speculation(self, decode_items: list[ScheduledRequest], available: dict[str, int],
                             num_decodes: int, cap_left: int, budget_left: int, plan: StepPlan) -> None:
        """Choose how many proposals each decode verifies, within what prompts left of the budget
        and of the policy's cap, and reserve their KV (without preempting anyone for them)."""
        offers = {}
        for item in decode_items:
            request = self.requests[item.request_id]
            # Never past max_tokens: the step's own token is one more.
            k = min(available.get(item.request_id, 0), request.max_output_tokens - request.num_output_tokens - 1)
            if k > 0:
                offers[item.request_id] = k
        room = max(0, min(budget_left, cap_left))
        if not offers or room == 0:
            return
        if self.spec_lengths is None:
            lengths = offers
        else:
            lengths = self.spec_lengths(offers, num_decodes, plan.num_prompt_tokens, room)
        for item in decode_items:
            k = min(lengths.get(item.request_id, 0), room)
            if k <= 0:
                continue
            request = self.requests[item.request_id]
            if self.kv.allocate(request, request.num_computed_tokens + 1 + k):
                item.num_spec_reserved = k
                room -= k

    def _plan(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        is_decode = num_new == 1 and request.num_output_tokens > 0 and start == request.num_tokens - 1
        return ScheduledRequest(request.request_id, request.token_ids[start:start + num_new], start, (),
                                samples=start + num_new == request.num_tokens, is_decode=is_decode)

    def _attach_blocks(self, item: ScheduledRequest) -> None:
        """Give the runner the blocks it has not seen: the whole table on admission, else the new tail."""
        request_id = item.request_id
        table = self.kv.block_tables[request_id]
        sent = self._blocks_sent.get(request_id)
        if sent is None:
            request = self.requests[request_id]
            item.new = NewRequestData(request.prompt_token_ids, tuple(request.token_ids[request.num_prompt_tokens:]),
                                      request.sampling_params, request.grammar, request.lora_request)
            sent = 0
        item.new_block_ids = tuple(table[sent:])
        self._blocks_sent[request_id] = len(table)

    def _shed(self, now: float, plan: StepPlan) -> None:
        """Turn away waiting requests the policy says can no longer be served within their SLO."""
        if not self._may_shed:
            return
        shed = [r for r in self.waiting if self.policy.admit(r, now) is Admission.SHED]
        for request in shed:
            self._finish(request, RequestStatus.FINISHED_REJECTED, now)
            plan.rejected.append(request)

    def record_step_time(self, plan: StepPlan, seconds: float) -> None:
        """Feed the measured duration of an executed plan to the cost model the policies use."""
        tokens = rows = 0  # plan.num_batched_tokens and plan.num_sampled_rows, in one pass
        for item in plan.scheduled:
            tokens += len(item.token_ids)
            if item.samples:
                rows += 1
            if item.spec_token_ids:  # verified proposals: batched, and sampled where the chunk samples
                spec = len(item.spec_token_ids)
                tokens += spec
                if item.samples:
                    rows += spec
        self.cost_model.observe(tokens, len(plan.scheduled), seconds, rows)

    def _allocate_or_preempt(self, request: Request, num_new: int, plan: StepPlan, now: float) -> bool:
        while not self.kv.allocate(request, request.num_computed_tokens + num_new):
            scheduled_ids = {item.request_id for item in plan.scheduled}  # rare: memory ran out
            candidates = [r for r in self.running if r.request_id not in scheduled_ids]
            # Bound preemptions per request so nothing thrashes: spare the often-preempted if possible.
            spared = [r for r in candidates if r.num_preemptions < self.config.max_preemptions_per_request]
            victim = self.policy.pick_victim(spared or candidates, now)
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        # Recompute later; its full blocks stay in the prefix cache, so the recompute is often a hit.
        self.kv.free(request)
        self._leave_running(request)
        # The runner keeps its state (a seeded generator goes on where it was); the request is
        # re-sent as new, with a new block table, when it is admitted again.
        self._blocks_sent.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    # ---- results ------------------------------------------------------------------------
    def update_from_output(self, plan: StepPlan, output: ModelRunnerOutput, now: float) -> list[FinishedUpdate]:
        """Advance computed counts, append sampled tokens, retire finished requests.

        A speculative step returns the accepted proposals plus one token; the KV written for the
        rejected ones lies beyond num_computed_tokens and is overwritten later (the rollback).
        """
        updates = []
        append_update = updates.append
        requests, sampled, running = self.requests, output.sampled_token_ids, RequestStatus.RUNNING
        kv, on_tokens = self.kv, self._on_tokens
        # Full blocks to index only when the computed tokens crossed a block boundary (checked
        # here: a call per request per step otherwise).
        indexed = kv.indexed_blocks if kv.enable_prefix_caching else None
        block_size = kv.block_size
        for item in plan.scheduled:
            request_id = item.request_id
            request = requests.get(request_id)
            if request is None or request.status is not running:
                continue  # aborted while the step ran
            tokens = sampled.get(request_id, ())
            computed = request.num_computed_tokens + len(item.token_ids)
            if item.spec_token_ids:
                computed += output.num_accepted(item)
            request.num_computed_tokens = computed
            if indexed is not None and computed // block_size > indexed[request_id]:
                kv.cache_full_blocks(request)
            if on_tokens is not None:
                on_tokens(request, item.num_prompt_tokens, len(tokens))
            if not tokens:
                continue
            if len(tokens) == 1:  # the common case: one token, kept whatever it ends
                kept = tokens
                finish_reason = request.append_token(tokens[0])
                if finish_reason is not None:
                    self._finish(request, RequestStatus(finish_reason), now)
            else:
                finish_reason, kept = None, []
                for token_id in tokens:
                    kept.append(token_id)
                    finish_reason = request.append_token(token_id)
                    if finish_reason is not None:
                        self._finish(request, RequestStatus(finish_reason), now)
                        break
            append_update((request, kept, finish_reason))
        return updates

    def finish_requests(self, request_ids: list[str], status: RequestStatus, now: float) -> list[Request]:
        """Remove requests (abort, or a stop string the front end saw) and free their blocks."""
        done = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            self._finish(request, status, now)
            done.append(request)
        return done

    def _finish(self, request: Request, status: RequestStatus, now: float) -> None:
        if request.status is RequestStatus.RUNNING:
            self._leave_running(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.finished_time = now
        self.kv.free(request)
        self._blocks_sent.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)  # the runner may hold state even if it waits now
        del self.requests[request.request_id]
        self.policy.on_finished(request, now)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        assert len(self.running) + len(self.waiting) == len(self.requests)
        assert all(r.status is RequestStatus.RUNNING for r in self.running)
        assert all(r.request_id not in self.kv.block_tables for r in self.waiting)
        assert len(self.running) <= self.config.max_num_seqs
        adapters: dict[int, int] = {}
        for request in self.running:
            if request.adapter is not None:
                adapters[request.adapter] = adapters.get(request.adapter, 0) + 1
        assert adapters == self.lora_running, f"adapter counts {self.lora_running}, running {adapters}"
        assert self.max_loras is None or len(self.lora_slots) <= self.max_loras
        assert set(adapters) <= set(self.lora_slots), "a running adapter holds no slot"
        assert set(self._blocks_sent) <= {r.request_id for r in self.running}, "runner state of a request not running"
        for request in self.running:
            sent = self._blocks_sent.get(request.request_id)
            assert sent is None or sent == len(self.kv.block_tables[request.request_id]), \
                f"{request.request_id}: the runner was told of {sent} blocks"
