"""What rank 0 and a tensor-parallel rank on another host say to each other over TCP: data under
a declared schema (punctual/wire), after the rank proved it holds the group's secret; never a
pickle (whoever reaches the port could have it run code).

    rank 0 -> rank   RankCommand: execute (a RankPlan) | stats | stop
    rank -> rank 0   RankReport: hello ({"rank", "pid"}) | started ({"node_id"}) | ready | stats (a dict)
                     | error (a traceback's text)

A RankPlan is the StepPlan as the ranks run it (runner/tensor_parallel.py's _for_ranks): the
scheduled work and KV orders, in types the codec declares. What tensor parallelism refuses at
start-up (draft-model probabilities, KV received from another engine) has no field here.
"""
from __future__ import annotations

from dataclasses import dataclass

from punctual.lora.request import LoRARequest
from punctual.plan import KVCopyOrders, KVEviction, NewRequestData, ScheduledRequest, StepPlan
from punctual.sampling_params import SamplingParams
from punctual.structured.spec import StructuredOutput
from punctual.wire.codec import Schema


@dataclass
class RankNewRequest:
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    lora_request: LoRARequest | None = None


@dataclass
class RankScheduled:
    request_id: str
    token_ids: list[int]
    start_position: int
    new_block_ids: tuple[int, ...]
    samples: bool
    is_decode: bool
    new: RankNewRequest | None
    spec_token_ids: list[int]
    num_spec_reserved: int
    position_offset: int


@dataclass
class RankPlan:
    scheduled: list[RankScheduled]
    finished_request_ids: list[str]
    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    kv_evictions: list[KVEviction]


@dataclass
class RankCommand:
    kind: str  # execute | stats | stop
    plan: RankPlan | None = None


@dataclass
class RankReport:
    kind: str  # hello | started | ready | stats | error
    payload: dict | str | None = None


SCHEMA = Schema("punctual.tp.ranks", [SamplingParams, StructuredOutput, LoRARequest, KVEviction, RankNewRequest,
                                      RankScheduled, RankPlan, RankCommand, RankReport])


def to_rank_plan(plan: StepPlan) -> RankPlan:
    """The plan's data the ranks read (the plan is _for_ranks'; no live Request, no grammar)."""
    if plan.kv_copies.writes:  # refused with tensor parallelism (engine/core.py): never here
        raise ValueError("KV received from another engine cannot be sent to tensor-parallel ranks")
    scheduled = []
    for item in plan.scheduled:
        if item.draft_probs is not None:  # a draft model is refused with tensor parallelism (config.py)
            raise ValueError("a draft model's probabilities cannot be sent to tensor-parallel ranks")
        new = item.new
        scheduled.append(RankScheduled(
            item.request_id, list(item.token_ids), item.start_position, tuple(item.new_block_ids), item.samples,
            item.is_decode,
            None if new is None else RankNewRequest(tuple(new.prompt_token_ids), tuple(new.output_token_ids),
                                                     new.sampling_params, new.lora_request),
            list(item.spec_token_ids), item.num_spec_reserved, item.position_offset))
    return RankPlan(scheduled, list(plan.finished_request_ids), list(plan.kv_copies.swap_out),
                    list(plan.kv_copies.swap_in), list(plan.kv_evictions))


def to_step_plan(plan: RankPlan) -> StepPlan:
    scheduled = [ScheduledRequest(
        item.request_id, item.token_ids, item.start_position, item.new_block_ids, item.samples, item.is_decode,
        None if item.new is None else NewRequestData(item.new.prompt_token_ids, item.new.output_token_ids,
                                                     item.new.sampling_params, lora_request=item.new.lora_request),
        tuple(item.spec_token_ids), num_spec_reserved=item.num_spec_reserved, position_offset=item.position_offset)
        for item in plan.scheduled]
    return StepPlan(scheduled, plan.finished_request_ids,
                    KVCopyOrders(swap_out=plan.swap_out, swap_in=plan.swap_in), plan.kv_evictions)


def encode_command(kind: str, plan: StepPlan | None = None) -> bytes:
    return SCHEMA.pack(RankCommand(kind, None if plan is None else to_rank_plan(plan)))


def decode_command(data: bytes | bytearray) -> tuple[str, StepPlan | None]:
    command = SCHEMA.unpack(data, RankCommand)
    return command.kind, None if command.plan is None else to_step_plan(command.plan)


def encode_report(kind: str, payload: dict | str | None = None) -> bytes:
    return SCHEMA.pack(RankReport(kind, payload))


def decode_report(data: bytes | bytearray) -> tuple[str, dict | str | None]:
    report = SCHEMA.unpack(data, RankReport)
    return report.kind, report.payload
