"""How many tokens to speculate per request and step (SmartSpec's goodput criterion).

Each request keeps an estimate `a` of the chance that a proposed token is accepted. The j-th
proposed token adds a^j expected tokens to the step and costs one more batched token and one
more sampled row of step time (the scheduler's measured cost model). Tokens are added, best first, only while they raise
the step's useful tokens per second: at high load a step already yields many tokens per second,
so speculation switches itself off, and requests whose proposals fail stop proposing.

Prompt tokens in the step count as useful work, one each, like a generated token: they are as
certain, and TTFT waits on them. So a step that carries a prompt chunk already does much work
per second and speculation must be accepted often to join it, and a proposed token never
takes the place of a prompt token (it would trade a certain token for a^j of one): proposals
only use the budget the step's prompt chunks leave.
"""
from __future__ import annotations

import heapq

from punctual.sched.cost_model import StepCostModel


class AcceptanceTracker:
    """Exponential average of each request's per-token acceptance rate, and of all requests'.

    A request that has not proposed yet starts from the engine-wide average, not from a fixed
    guess: with a draft model that agrees with the target one time in forty, a fresh request
    would otherwise pay for several rejected drafts (and the draft's catch-up over its whole
    prompt) before its own average fell far enough to stop it.
    """

    def __init__(self, prior: float = 0.6, weight: float = 0.3, global_weight: float = 0.05):
        self.prior = prior
        self.weight = weight
        self.global_weight = global_weight
        self.global_rate = prior
        self.rates: dict[str, float] = {}

    def rate(self, request_id: str) -> float:
        return self.rates.get(request_id, self.global_rate)

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        sample = accepted / proposed
        old = self.rates.get(request_id, self.global_rate)
        self.rates[request_id] = old + self.weight * (sample - old)
        self.global_rate += self.global_weight * (sample - self.global_rate)

    def forget(self, request_id: str) -> None:
        self.rates.pop(request_id, None)


def choose_lengths(proposals: dict[str, int], rates: dict[str, float], cost: StepCostModel,
                   base_tokens: int, num_seqs: int, depth_cost_s: float = 0.0, prompt_tokens: int = 0,
                   max_total: int | None = None) -> dict[str, int]:
    """Per request, how many of its `proposals[id]` drafted tokens to verify this step.

    base_tokens: tokens the step computes anyway (decodes + prompt chunks); num_seqs: decoding
    sequences; prompt_tokens: the prompt-chunk tokens among base_tokens (useful work, one each).
    depth_cost_s: the time of drafting one more token for the whole batch (a draft model's
    forward; 0 for prompt lookup), paid when the deepest proposal grows by one.
    max_total: the most proposed tokens the step has room for (what its prompt chunks leave).
    """
    chosen = {rid: 0 for rid in proposals}
    room = float("inf") if max_total is None else max_total
    # Every decoding sequence yields at least one token; every prompt token is work done.
    expected = float(num_seqs + prompt_tokens)
    num_seqs_in_step = num_seqs + (1 if prompt_tokens else 0)
    batched = base_tokens
    rows = num_seqs + (1 if prompt_tokens else 0)  # one sampled row per sequence; each proposal adds one
    step_time = cost.predict(batched, num_seqs_in_step, rows)
    depth = 0
    heap = [(-rates[rid], rid, 1) for rid, n in proposals.items() if n > 0]
    heapq.heapify(heap)
    while heap and batched - base_tokens < room:
        neg_gain, rid, j = heapq.heappop(heap)
        gain = -neg_gain
        new_time = cost.predict(batched + 1, num_seqs_in_step, rows + 1) + depth_cost_s * max(depth, j)
        if step_time <= 0 or (expected + gain) / new_time <= expected / step_time:
            break  # the best remaining token would lower tokens per second: so would every other
        chosen[rid] = j
        expected += gain
        batched += 1
        rows += 1
        depth = max(depth, j)
        step_time = new_time
        if j < proposals[rid]:
            heapq.heappush(heap, (-(gain * rates[rid]), rid, j + 1))
    return chosen
