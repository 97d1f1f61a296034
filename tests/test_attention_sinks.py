"""Attention sinks (StreamingLLM): streams past max_model_len in bounded KV, positions within the cache."""
from __future__ import annotations

import pytest
import torch

from punctual import LLM, SamplingParams
from punctual.config import EngineConfig, SchedulerConfig
from punctual.kv.manager import KVCacheManager
from punctual.models.decoder import apply_rope
from punctual.models.kv_shift import KeyShifter
from punctual.models.attention import LayerKVCache
from punctual.models.rope import rope_tables
from punctual.plan import ModelRunnerOutput
from punctual.request import EngineCoreRequest, Request, RequestStatus
from punctual.runner.runner import TokenChunk
from punctual.sampling_params import SamplingParams as Params
from punctual.sched.scheduler import Scheduler

BLOCK = 4
MAX_LEN = 32
SINKS, WINDOW = 4, 28  # 1 sink block + 7 window blocks: 32 tokens, so eviction starts past max_model_len
ENGINE = dict(dtype="float32", num_kv_blocks=32, max_num_batched_tokens=64, block_size=BLOCK, max_model_len=MAX_LEN)
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def dense():
    return LLM("builtin-tiny", **ENGINE)


@pytest.fixture(scope="module")
def stream():
    return LLM("builtin-tiny", attention_sinks=SINKS, streaming_window=WINDOW, **ENGINE)


def sampled(max_tokens: int | None) -> SamplingParams:
    # Seeded sampling, not greedy: a random tiny model's greedy output soon repeats one token.
    return SamplingParams(temperature=1.0, seed=11, max_tokens=max_tokens, ignore_eos=True)


def test_sinks_off_keeps_the_context_limit(dense):
    out = dense.generate(PROMPT, sampled(None), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == MAX_LEN
    assert out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="context window"):
        dense.generate(PROMPT * 20, sampled(4), use_tqdm=False)
    assert dense.engine.core.scheduler.sink_tokens == -1  # no gap to skip, ever


def test_stream_equals_dense_then_runs_to_max_tokens_in_bounded_blocks(dense, stream):
    reference = dense.generate(PROMPT, sampled(None), use_tqdm=False)[0].outputs[0].token_ids
    engine, core = stream.engine, stream.engine.core
    bound = -(-SINKS // BLOCK) + -(-WINDOW // BLOCK) + 1
    engine.add_request("long", PROMPT, sampled(MAX_LEN + 4 * BLOCK))
    tokens, finish, evicted = [], None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids[len(tokens):] if out.outputs else []
            finish = out.outputs[0].finish_reason
        core.check_integrity()
        assert core.kv_manager.num_used_blocks <= bound
        request = core.scheduler.requests.get("long")
        evicted = request.num_evicted_tokens if request is not None else evicted
    assert finish == "length" and len(tokens) == MAX_LEN + 4 * BLOCK
    assert tokens[:len(reference)] == reference  # the first max_model_len tokens: as dense
    assert evicted > 0 and core.kv_manager.num_used_blocks == 0  # no block leaked


def test_window_keys_are_those_of_a_fresh_pass_at_cache_positions(stream):
    """After evictions, the cache holds what a fresh forward pass over the sinks and the window's
    tokens at their cache positions writes. Layer 0 keys and values depend on the token and its
    position only, so they must agree to rounding (deeper layers saw the evicted tokens)."""
    engine, core = stream.engine, stream.engine.core
    scheduler, kv, runner = core.scheduler, core.kv_manager, core.runner
    engine.add_request("probe", PROMPT, sampled(MAX_LEN + 4 * BLOCK))
    request = scheduler.requests["probe"]
    while request.num_evicted_tokens < 3 * BLOCK:
        engine.step()
    sink, evicted = scheduler.sink_tokens, request.num_evicted_tokens
    view = request.token_ids[:sink] + request.token_ids[sink + evicted:request.num_computed_tokens]
    assert len(view) == scheduler.kv_tokens(request)
    table = kv.block_tables["probe"]
    fresh = kv.pool.allocate(len(table))
    try:
        runner.last_logits([TokenChunk(view, 0, fresh)])
        layer, n = runner.kv_caches[0], len(view)
        for name in ("k", "v"):  # another batch shape: equal up to rounding
            cached, recomputed = (getattr(layer, name)[torch.tensor(t)].flatten(0, 1)[:n] for t in (table, fresh))
            assert torch.allclose(cached, recomputed, atol=1e-5, rtol=1e-4), name
    finally:
        kv.pool.release(fresh)
    engine.abort_request("probe")
    core.check_integrity()


@pytest.mark.parametrize("scaling, quantized", [
    (None, False), ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, False),
    (None, True)])
def test_rerotation_is_exact(scaling, quantized):
    """Attention over keys cached at old positions and shifted equals attention over the same raw
    keys rotated at the new positions (a yarn table scales cos/sin: the shift must not). An int8
    cache is re-quantized: equal to its rounding."""
    from punctual.checkpoints.loader import resolve_model_path
    from punctual.models.registry import load_arch_config
    import dataclasses

    arch = load_arch_config(resolve_model_path("builtin-tiny"))
    arch = dataclasses.replace(arch, rope_scaling=scaling, max_position_embeddings=256)
    spec = arch.rope_of(0)
    cos, sin = rope_tables(spec, 256)
    torch.manual_seed(0)
    heads, dim, blocks, shift = arch.num_kv_heads, arch.head_dim, 3, 5 * BLOCK
    raw = torch.randn(blocks * BLOCK, heads, dim)
    values = torch.randn(blocks * BLOCK, heads, dim)
    old = torch.arange(40, 40 + blocks * BLOCK)
    caches = [LayerKVCache(8, BLOCK, heads, dim, torch.float32, torch.device("cpu"), quantized)
              for _ in range(arch.num_layers)]
    tolerance = 0.05 if quantized else 1e-5  # int8: twice a step of absmax / 127 on keys of absmax ~4
    block_ids = [6, 2, 5]
    slots = torch.tensor([b * BLOCK + i for b in block_ids for i in range(BLOCK)])
    for cache in caches:
        cache.write(apply_rope(raw, cos[old][:, None], sin[old][:, None]), values, slots)
    KeyShifter(arch, 256, torch.device("cpu")).shift(caches, block_ids, 40, shift)
    new = old - shift
    expected = apply_rope(raw, cos[new][:, None], sin[new][:, None])
    query = apply_rope(torch.randn(1, heads, dim), cos[new[-1:] + 1][:, None], sin[new[-1:] + 1][:, None])

    def attend(keys):
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", query, keys) / dim ** 0.5, dim=-1)
        return torch.einsum("hqk,khd->qhd", weights, values)

    for cache in caches:
        keys = cache.gather(torch.tensor([block_ids]))[0][0].transpose(0, 1)  # [tokens, heads, dim]
        assert torch.allclose(keys, expected, atol=tolerance)
        assert torch.allclose(attend(keys), attend(expected), atol=tolerance)


# ---- the scheduler and KV manager alone: a fake runner that keeps each block's tokens ------------
class TokenCache:
    """What a runner's KV would hold, as token ids per block: writes through the slot each
    scheduled token's KV position maps to; evictions only close the table's gap (re-rotation
    changes keys, not which token a slot holds)."""

    def __init__(self, kv: KVCacheManager):
        self.kv, self.blocks = kv, {}

    def run(self, scheduler: Scheduler, token: int) -> None:
        plan = scheduler.schedule(0.0)
        for item in plan.scheduled:
            table = self.kv.block_tables[item.request_id]
            for i, token_id in enumerate(item.token_ids):
                position = item.start_position - item.position_offset + i
                self.blocks.setdefault(table[position // BLOCK], [None] * BLOCK)[position % BLOCK] = token_id
        sampled = {s.request_id: [token] for s in plan.scheduled if s.samples}
        scheduler.update_from_output(plan, ModelRunnerOutput(sampled), 0.0)
        scheduler.check_integrity()

    def view(self, request_id: str, num_tokens: int) -> list[int]:
        table = self.kv.block_tables[request_id]
        return [self.blocks[table[p // BLOCK]][p % BLOCK] for p in range(num_tokens)]


def streaming_scheduler(num_blocks: int, sinks: int = 4, window: int = 16, budget: int = 64, policy: str = "fcfs"):
    kv = KVCacheManager(num_blocks, BLOCK)
    config = SchedulerConfig(max_num_batched_tokens=budget, attention_sinks=sinks, streaming_window=window,
                             scheduling_policy=policy)
    return Scheduler(config, kv), kv


def make_request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(EngineCoreRequest(rid, prompt, Params(max_tokens=max_tokens, ignore_eos=True)), max_model_len=32)


def assert_cache_is_sinks_then_window(scheduler: Scheduler, cache: TokenCache, request: Request) -> None:
    sink, evicted = scheduler.sink_tokens, request.num_evicted_tokens
    expected = request.token_ids[:sink] + request.token_ids[sink + evicted:request.num_computed_tokens]
    assert cache.view(request.request_id, scheduler.kv_tokens(request)) == expected


def test_long_prompt_and_preemption_recompute_the_cache_as_it_was():
    # Two streams of 5 blocks cannot both run in 8: the one served first preempts the other.
    scheduler, kv = streaming_scheduler(num_blocks=8, policy="priority")
    cache = TokenCache(kv)
    a = make_request("a", list(range(100, 150)), 40)  # a prompt past max_model_len (32) and the window
    scheduler.add_request(a, 0.0)
    for step in range(30):
        cache.run(scheduler, 1000 + step)
        assert_cache_is_sinks_then_window(scheduler, cache, a)
        assert len(kv.block_tables["a"]) <= scheduler.stream_blocks
    assert a.num_evicted_tokens > 0 and a.num_output_tokens > 0
    b = make_request("b", list(range(200, 206)), 60)
    b.priority = -1  # served first: it grows into a's blocks, and a is recomputed after an eviction
    scheduler.add_request(b, 0.0)
    while scheduler.requests:
        cache.run(scheduler, 2000)
        for request in scheduler.running:
            if request.num_computed_tokens >= request.num_tokens - 1:  # its cache is whole again
                assert_cache_is_sinks_then_window(scheduler, cache, request)
    assert a.num_preemptions > 0
    assert a.status is RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 40
    assert b.status is RequestStatus.FINISHED_LENGTH and b.num_output_tokens == 60
    assert kv.num_used_blocks == 0


def test_sink_blocks_stay_shareable_and_window_blocks_are_never_indexed():
    scheduler, kv = streaming_scheduler(num_blocks=32)
    cache = TokenCache(kv)
    first = make_request("first", list(range(100, 130)), 30)
    scheduler.add_request(first, 0.0)
    while scheduler.requests:
        cache.run(scheduler, 7)
    assert first.num_evicted_tokens > 0
    assert kv.pool.num_cached_blocks == scheduler.sink_blocks  # only the sinks were published
    second = make_request("second", list(range(100, 130)), 30)
    scheduler.add_request(second, 0.0)
    cache.run(scheduler, 7)
    assert second.num_cached_tokens == scheduler.sink_tokens
    assert_cache_is_sinks_then_window(scheduler, cache, second)


def test_bad_streaming_arguments_are_named():
    with pytest.raises(ValueError, match="attention_sinks needs streaming_window"):
        EngineConfig.from_kwargs("builtin-tiny", attention_sinks=4)
    with pytest.raises(ValueError, match="streaming_window must be >= 1"):
        EngineConfig.from_kwargs("builtin-tiny", streaming_window=0)
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig.from_kwargs("builtin-tiny", streaming_window=64, speculative_method="ngram")
    with pytest.raises(ValueError, match="must fit max_model_len"):
        LLM("builtin-tiny", attention_sinks=4, streaming_window=MAX_LEN, **ENGINE)


def test_a_streamed_request_moves_between_engines_with_its_window():
    """A KV move of a request past its first eviction: the pre-copy takes only the sinks (the
    window moves meanwhile), the stop-and-copy the rest; the target goes on as the source would."""
    from punctual.engine.core import EngineCore

    def core() -> EngineCore:
        return EngineCore(EngineConfig.from_kwargs("builtin-tiny", attention_sinks=SINKS, streaming_window=WINDOW,
                                                   **ENGINE))

    def run(engine: EngineCore, tokens: list[tuple[int, float]], until=lambda: False) -> None:
        while engine.has_unfinished_requests() and not until():
            for out in engine.step():
                tokens.extend((lp.token_id, lp.logprob) for lp in out.new_logprobs or ())
        engine.check_integrity()

    # Greedy, with each token's logprob: a random tiny model soon repeats one token, but the
    # logprob still depends on every key and position in the cache.
    params = Params(temperature=0, max_tokens=MAX_LEN + 4 * BLOCK, ignore_eos=True, logprobs=1)
    prompt = [7, 300, 42, 1999, 5, 64, 800, 3, 1024, 77]
    alone: list[tuple[int, float]] = []
    single = core()
    single.add_request(EngineCoreRequest("a", prompt, params))
    run(single, alone)

    source, target, moved = core(), core(), []
    source.add_request(EngineCoreRequest("a", prompt, params))
    request = source.scheduler.requests["a"]
    run(source, moved, until=lambda: request.num_evicted_tokens > 0)
    precopy = source.export_kv("a")
    assert precopy.num_blocks == source.scheduler.sink_blocks
    assert target.reserve_import("a", precopy.num_blocks)
    target.receive_kv("a", 0, precopy)
    evicted = request.num_evicted_tokens
    run(source, moved, until=lambda: request.num_evicted_tokens > evicted + BLOCK)
    state, rest = source.migrate_out("a", first_block=precopy.num_blocks)
    assert state.num_evicted_tokens == request.num_evicted_tokens
    assert target.commit_import(state, precopy.num_blocks, rest)
    run(target, moved)
    assert len(moved) == len(alone) == MAX_LEN + 4 * BLOCK
    assert [t for t, _ in moved] == [t for t, _ in alone]
    assert [lp for _, lp in moved] == pytest.approx([lp for _, lp in alone], abs=1e-5)
    assert source.kv_manager.num_used_blocks == target.kv_manager.num_used_blocks == 0
