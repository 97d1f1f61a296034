"""A decode-only step repeated: the simulator's fast path through the shipped scheduler.

A replica whose running requests all decode, with nothing waiting, plans the same step again
and again, each request one token further, until a request finishes, memory runs short or a
request arrives. The simulator prices such a run at once and applies its steps only when
something reads the replica (the router, an arrival, the run's end). A DecodeRun applies them
in the order the step-by-step calls would: each step's end as record_step_time and
update_from_output (a cost observation; at a block boundary the prefix cache indexes the full
block), each next step's start as schedule (a request whose next token needs a block allocates
it, in plan order). Every sampled token is `token_id`. The engine never uses this;
tests/sim/test_fast_path.py checks it against planning every step.

Ops are numbered in time order: op 2j ends step j (j = 0 is the plan that was scheduled), op
2j + 1 starts step j + 1. A run of `steps` repeats has 2 * steps ops; the end of its last step
is not one of them (it may finish requests: the caller ends it with update_from_output).
"""
from __future__ import annotations

from bisect import bisect_left

from punctual.plan import StepPlan
from punctual.sched.scheduler import Scheduler

MAX_RUN_STEPS = 128  # the longest run planned at once: its repeats are priced PRICE_AHEAD at a time (sim/replica.py)


class DecodeRun:
    def __init__(self, scheduler: Scheduler, plan: StepPlan, token_id: int, steps: int,
                 fills: dict[int, list[int]], allocs: dict[int, list[int]]):
        self.scheduler = scheduler
        self.request_ids = [item.request_id for item in plan.scheduled]
        self.requests = [scheduler.requests[i] for i in self.request_ids]
        self.token_id = token_id
        self.steps = steps
        self.fills = fills  # step -> the plan's requests (indices) whose end of that step indexes a block
        self.allocs = allocs  # step -> requests that allocate a block at that step's start
        # The ops that change what the router sees (indexed blocks, free blocks), in order.
        self.visible_ops = sorted([2 * step for step in fills] + [2 * step - 1 for step in allocs])
        # Each block the run allocates, by its op, in the order the pool hands them out.
        self.alloc_ops = [op for step in sorted(allocs) for op in [2 * step - 1] * len(allocs[step])]
        self.done = 0  # ops applied
        self._ends = [0] * len(self.requests)  # step ends applied to each request (its tokens)

    @property
    def ends_done(self) -> int:
        return (self.done + 1) // 2

    def blocks_taken(self, first: int, last: int) -> int:
        """Blocks the ops in [first, last) allocate (one per request past its table)."""
        ops = self.alloc_ops
        return bisect_left(ops, last) - bisect_left(ops, first) if last > first else 0

    def _catch(self, index: int, ends: int) -> None:
        """Bring one request's tokens to `ends` step ends."""
        count = ends - self._ends[index]
        if count:
            request = self.requests[index]
            request.num_computed_tokens += count
            request.extend_tokens(self.token_id, count)
            self._ends[index] = ends

    def advance(self, ops: int, times: list[float]) -> None:
        """Apply ops up to `ops` (then `settle` before the scheduler is read); `times`: each
        step's start, then the last one's end (a step's seconds as finish_step measures them:
        end - start). The cost model and the KV manager share no state, so the step ends'
        observations go in one call and only the ops that touch blocks are visited, in order."""
        done = self.done
        if ops <= done:
            return
        scheduler = self.scheduler
        kv, requests = scheduler.kv, self.requests
        num_seqs = len(requests)
        first_end, last_end = (done + 1) >> 1, (ops + 1) >> 1  # steps whose ends are ops in [done, ops)
        if last_end > first_end:
            scheduler.cost_model.observe_steps(num_seqs, num_seqs, [times[step + 1] - times[step] for step in
                                                                    range(first_end, last_end)], num_seqs)
        if ops >> 1 > done >> 1:  # a step starts: schedule() clears its per-step memo
            scheduler._prefix_memo.clear()
        visible = self.visible_ops
        for position in range(bisect_left(visible, done), bisect_left(visible, ops)):
            op = visible[position]
            if not op & 1:  # step `op // 2` ends: blocks its tokens filled are indexed
                step = op >> 1
                for index in self.fills[step]:
                    self._catch(index, step + 1)
                    kv.cache_full_blocks(requests[index])
            else:  # step `op // 2 + 1` starts: requests past their tables allocate, in plan order
                step = (op >> 1) + 1
                for index in self.allocs[step]:
                    self._catch(index, step)
                    request = requests[index]
                    allocated = kv.allocate(request, request.num_computed_tokens + 1)
                    assert allocated, "a repeat ran out of blocks"
                    scheduler._blocks_sent[request.request_id] = len(kv.block_tables[request.request_id])
        self.done = ops

    def settle(self) -> None:
        """Bring every request's tokens to the steps ended (advance brings only those whose
        blocks it touches: the others are read by nobody until the run stops)."""
        ends = self.ends_done
        for index in range(len(self.requests)):
            self._catch(index, ends)


def decode_run(scheduler: Scheduler, plan: StepPlan, token_id: int, max_steps: int = MAX_RUN_STEPS) -> DecodeRun | None:
    """The run of repeats that follows `plan` (just scheduled, not yet run), or None: every
    running request decodes, nothing waits, no policy hook with state to feed, and at least one
    repeat ends nobody. A repeat stops short of any request's last token and of a step that could
    not allocate without preempting. Under a policy that reorders requests each step, a run also
    stops short of every block boundary (its order would decide the blocks' order)."""
    if (scheduler.waiting or plan.preempted or plan.rejected or scheduler._on_tokens is not None
            or scheduler._may_shed or scheduler._reads_decodes or len(plan.scheduled) != len(scheduler.running)):
        return None
    kv = scheduler.kv
    block_size, tables = kv.block_size, kv.block_tables
    indexed = kv.indexed_blocks if kv.enable_prefix_caching else None
    steps = max_steps
    for item in plan.scheduled:
        if not item.is_decode or item.spec_token_ids or item.num_spec_reserved:
            return None
        steps = min(steps, scheduler.requests[item.request_id].tokens_before_finish(token_id))
    if steps <= 0:
        return None
    fills: dict[int, list[int]] = {}
    allocs: dict[int, list[int]] = {}
    for index, item in enumerate(plan.scheduled):
        start = item.start_position
        if indexed is not None:
            # The end of step j indexes blocks when the computed tokens (start + j + 1) fill one
            # past those indexed.
            step = max(0, (indexed[item.request_id] + 1) * block_size - start - 1)
            while step < steps:
                fills.setdefault(step, []).append(index)
                step = ((start + step + 1) // block_size + 1) * block_size - start - 1
        step = len(tables[item.request_id]) * block_size - start  # computes the first position past its table
        while step <= steps:
            allocs.setdefault(step, []).append(index)
            step += block_size
    if not scheduler._fixed_order:
        first = min([step + 1 for step in fills] + [step for step in allocs], default=steps + 1)
        steps = first - 1
    else:
        free = kv.num_free_blocks
        for step in sorted(allocs):
            free -= len(allocs[step])
            if free < 0:  # this step's start would preempt: the run ends the step before
                steps = step - 1
                break
    if steps <= 0:
        return None
    fills = {step: f for step, f in fills.items() if step < steps}
    allocs = {step: a for step, a in allocs.items() if step <= steps}
    return DecodeRun(scheduler, plan, token_id, steps, fills, allocs)


def truncated(run: DecodeRun, steps: int) -> None:
    """Keep the run's first `steps` repeats (pricing found a step it cannot charge)."""
    run.steps = steps
    run.fills = {step: f for step, f in run.fills.items() if step < steps}
    run.allocs = {step: a for step, a in run.allocs.items() if step <= steps}
    run.visible_ops = [op for op in run.visible_ops if op < 2 * steps]
    run.alloc_ops = [op for op in run.alloc_ops if op < 2 * steps]
