"""KV that moves between engines: disaggregated prefill and live migration, on two engines in
one process (the transport is the cluster's business; the mechanism is the engine's)."""
from __future__ import annotations

import pytest
import torch

from punctual import LLM, SamplingParams
from punctual.engine.core import EngineCore
from punctual.config import EngineConfig
from punctual.request import EngineCoreRequest

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = {"a": list(range(10, 47)), "b": [5, 9, 700, 31, 8, 1500, 44, 2, 19, 300]}


def engine(**kwargs) -> EngineCore:
    return EngineCore(EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=64, block_size=4,
                                               max_num_batched_tokens=16, **kwargs))


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    llm = LLM("builtin-tiny", dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS.values()], PARAMS, use_tqdm=False)
    return {rid: out.outputs[0].token_ids for rid, out in zip(PROMPTS, outs)}


def run(core: EngineCore, tokens: dict[str, list[int]], steps: int | None = None) -> None:
    """Step (all the way, or `steps` times), collecting each request's new tokens."""
    done = 0
    while core.has_unfinished_requests() and (steps is None or done < steps):
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        done += 1
    core.check_integrity()


def test_disaggregated_prefill_is_identical(reference):
    prefill, decode = engine(), engine()
    tokens: dict[str, list[int]] = {}
    for rid, prompt in PROMPTS.items():
        prefill.add_request(EngineCoreRequest(rid, prompt, PARAMS))
    while any(not tokens.get(rid) for rid in PROMPTS):  # until every prompt is prefilled
        run(prefill, tokens, steps=1)
    for rid in PROMPTS:
        first_token_time = prefill.scheduler.requests[rid].first_token_time
        state, payload = prefill.migrate_out(rid)
        assert state.first_token_time == first_token_time is not None
        assert decode.reserve_import(rid, 0) and decode.commit_import(state, 0, payload)
    assert prefill.kv_manager.num_used_blocks == 0 and not prefill.has_unfinished_requests()
    # The decode core goes on from requests that have their first token: it reports none of its own
    # (its step trace and stats would otherwise time a second first token).
    while decode.has_unfinished_requests():
        for out in decode.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.first_token_time is None
    decode.check_integrity()
    assert tokens == reference
    prefill.check_integrity()
    assert decode.kv_manager.num_used_blocks == 0


def test_live_migration_with_pre_copy_is_identical(reference):
    source, target = engine(), engine()
    tokens: dict[str, list[int]] = {}
    for rid, prompt in PROMPTS.items():
        source.add_request(EngineCoreRequest(rid, prompt, PARAMS))
    run(source, tokens, steps=6)
    request = source.scheduler.requests["a"]
    full = request.num_computed_tokens // 4
    assert full >= 2 and target.reserve_import("a", full)
    target.receive_kv("a", 0, source.export_kv("a"))  # stage 1: the full blocks, while "a" decodes on
    run(source, tokens, steps=5)
    state, rest = source.migrate_out("a", first_block=full)  # stop and copy what is left
    assert rest.num_blocks >= 1
    assert target.commit_import(state, full, rest)
    run(source, tokens)
    run(target, tokens)
    assert tokens == reference


def test_a_migration_called_off_leaves_the_request_at_the_source(reference):
    source, target = engine(), engine()
    tokens: dict[str, list[int]] = {}
    for rid, prompt in PROMPTS.items():
        source.add_request(EngineCoreRequest(rid, prompt, PARAMS))
    run(source, tokens, steps=6)
    assert target.reserve_import("a", 4)
    target.receive_kv("a", 0, source.export_kv("a", 0, 4))
    target.check_integrity()
    target.abort_import("a")  # the target calls it off (the source could, too: it just stops sending)
    assert target.kv_manager.num_used_blocks == 0
    target.check_integrity()
    run(source, tokens)
    assert tokens == reference
    assert source.kv_manager.num_used_blocks == 0


def test_int8_on_the_wire_halves_the_bytes_and_keeps_the_text_close():
    source = engine()
    source.add_request(EngineCoreRequest("a", PROMPTS["a"], PARAMS))
    run(source, {}, steps=4)
    raw, packed = source.export_kv("a"), source.export_kv("a", int8=True)
    head_dim = raw.k[0].shape[-1]
    # fp32 -> int8, plus a float32 scale per token and head
    assert packed.nbytes * 4 * head_dim == raw.nbytes * (head_dim + 4)
    for layer in range(len(raw.k)):
        restored = packed.k[layer].float() * packed.k_scale[layer].unsqueeze(-1)
        assert torch.allclose(restored, raw.k[layer], atol=raw.k[layer].abs().max().item() / 100)


def test_bad_transfers_are_refused():
    source, target = engine(), engine()
    source.add_request(EngineCoreRequest("a", PROMPTS["a"], PARAMS))
    run(source, {}, steps=4)
    with pytest.raises(ValueError, match="not running here"):
        source.export_kv("nobody")
    state, payload = source.migrate_out("a")
    with pytest.raises(ValueError, match="do not end at"):
        target.commit_import(state, 1, payload)
    assert target.kv_manager.num_used_blocks == 0
    target.check_integrity()
