"""What crosses the seam between the scheduler and the model runner: a step plan and its result.

Pure Python (no torch, no clock): the scheduler builds a `StepPlan`, the model runner (or the
simulator's cost model) executes it and returns a `ModelRunnerOutput`. A plan is
self-contained: the runner reads no live `Request`. What the runner keeps across steps (each
request's block table, penalty history, seeded generator) it updates from the plans it is
given, as vLLM v1's input batch does: a request's first plan after admission carries its
`NewRequestData`, later plans only the blocks it gained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from punctual.lora.request import LoRARequest
from punctual.request import TokenLogprobs
from punctual.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """Sent once per admission (the first step, and again after a preemption)."""

    prompt_token_ids: tuple[int, ...]
    # Tokens generated before a preemption: recomputed now, and part of the penalty history.
    output_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    # Structured output: the request's compiled grammar matcher (opaque here), which the runner
    # keeps and advances; it already holds output_token_ids.
    grammar: Any = None
    # The LoRA adapter the request runs under (None: the base model).
    lora_request: LoRARequest | None = None


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: feed `token_ids` then `spec_token_ids` at consecutive
    positions from `start_position`, writing KV through the request's block table.

    Built for every running request at every step: slotted, and without a list of its own
    until the speculator gives it proposals."""

    request_id: str
    token_ids: list[int]  # known tokens: a prompt chunk, a recomputation, or the one decode token
    start_position: int  # the request's num_computed_tokens when the step was planned
    new_block_ids: tuple[int, ...]  # appended to the runner's table (the whole table when `new` is set)
    samples: bool  # the chunk reaches the end of the known tokens: its last logits are sampled
    # The request's newest token only, after it has generated: not prompt work (a prompt chunk,
    # or recomputation after a preemption, is). The one definition the engine's metrics, the
    # policies and the cost model use.
    is_decode: bool = False
    new: NewRequestData | None = None
    # Speculative decoding: proposals verified after the known tokens, and the proposer's
    # distribution for each ([k, vocab] tensor; None for a deterministic proposer such as prompt lookup).
    spec_token_ids: Sequence[int] = ()
    draft_probs: Any = None
    # Proposal room the scheduler reserved (KV blocks, budget); the speculator fills up to this many.
    num_spec_reserved: int = 0
    # Attention sinks: tokens evicted from the KV cache before this chunk. `start_position` counts
    # the request's tokens; its KV (and rotary) position is start_position - position_offset.
    position_offset: int = 0

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) + len(self.spec_token_ids)

    @property
    def num_sampled_rows(self) -> int:
        return 1 + len(self.spec_token_ids) if self.samples else 0

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt work in this step: every known token fed, unless this is a decode."""
        return 0 if self.is_decode else len(self.token_ids)


@dataclass
class KVCopyOrders:
    """Block copies the runner makes before the step's forward pass, every copy out first (a block
    evicted and refilled in the same step is saved before it is overwritten)."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (pool block, tier slot)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (tier slot, pool block)
    # KV received from another engine (disaggregated prefill, migration): (pool blocks, a KVPayload
    # holding that many blocks), written after the tier's copies.
    writes: list[tuple[tuple[int, ...], Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.writes)


@dataclass(frozen=True)
class KVEviction:
    """Attention sinks: `num_blocks` blocks at `first_block` of a request's table were freed
    (the oldest of its window). The keys of `window_block_ids`, the blocks after them, move that
    many blocks' positions earlier (re-rotated), so cache positions stay contiguous."""

    request_id: str
    first_block: int
    num_blocks: int
    window_block_ids: tuple[int, ...]
    # The runner's table of the request still holds the evicted blocks (else it is told of the
    # table as it is now, when the request is next sent as new).
    in_runner_table: bool = True


@dataclass
class StepPlan:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests the runner must forget (finished, aborted or preempted since the last plan).
    finished_request_ids: list[str] = field(default_factory=list)
    kv_copies: KVCopyOrders = field(default_factory=KVCopyOrders)
    # Attention sinks: blocks evicted from requests' windows while planning, applied before the step runs.
    kv_evictions: list[KVEviction] = field(default_factory=list)
    # Scheduler-side bookkeeping, not read by the runner.
    preempted: list = field(default_factory=list)  # Requests preempted while planning
    rejected: list = field(default_factory=list)  # Requests shed by the policy: finished, never run

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of prompt chunks and recomputation (not decodes, not verified proposals)."""
        return sum(s.num_prompt_tokens for s in self.scheduled)

    @property
    def num_sampled_rows(self) -> int:
        """Positions whose logits the step computes: the last of each sampling chunk, and every
        verified position."""
        return sum(s.num_sampled_rows for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.rejected


# The scheduler's name for its plan, kept for readers of earlier code.
SchedulerOutput = StepPlan


@dataclass
class ModelRunnerOutput:
    """What one executed plan produced, per request that sampled."""

    # The accepted proposals, then one new token.
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Prompt logprobs of the positions this step computed (vLLM's prompt_logprobs; None for the first token).
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)

    def num_accepted(self, item: ScheduledRequest) -> int:
        """Proposals of `item` the verifier accepted."""
        if not item.spec_token_ids:
            return 0
        return max(0, len(self.sampled_token_ids.get(item.request_id, ())) - 1)


# A plan's cost features, summed over its scheduled requests (sim/profile.py explains each): what
# a step-cost profile charges, and what the serving core's step trace (engine/trace.py) records.
FEATURES = ("fixed", "prefill_tokens", "decode_rows", "context_tokens", "attention_pairs", "sampled_rows")


def plan_features(plan: StepPlan) -> tuple[float, ...]:
    """The plan's features in FEATURES order (1.0 first, for the fixed cost)."""
    prefill = decode = context = pairs = rows = 0
    for item in plan.scheduled:
        start = item.start_position - item.position_offset  # the KV it reads (attention sinks: the cache's)
        if item.is_decode and not item.spec_token_ids:  # the common case: one token, sampled
            decode += 1
            context += start + 1
            pairs += start + 1
            rows += 1
            continue
        new = len(item.token_ids) + len(item.spec_token_ids)
        if item.is_decode:
            decode += 1
        else:
            prefill += len(item.token_ids)
        context += start + new
        pairs += new * start + new * (new + 1) // 2
        if item.samples:
            rows += 1 + len(item.spec_token_ids)
    return (1.0, float(prefill), float(decode), float(context), float(pairs), float(rows))
