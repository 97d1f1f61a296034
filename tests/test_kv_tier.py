"""The second KV tier: evicted prefix blocks are saved, restored on a hit, and change nothing."""
from __future__ import annotations

import random

import pytest

from hf_models import VOCAB
from punctual import LLM, SamplingParams
from punctual.kv.tier import SecondaryTier

MAX_NEW = 12


def sequential_prompts() -> list[list[int]]:
    """A document, enough unrelated prompts to evict it from a small pool, the document again."""
    rng = random.Random(11)
    doc = [rng.randrange(VOCAB) for _ in range(70)]  # ends mid-block
    fillers = [[rng.randrange(VOCAB) for _ in range(rng.randrange(40, 70))] for _ in range(5)]
    return [doc + [7, 8]] + fillers + [doc + [9, 10, 11], doc[:50]]


def run_one_by_one(path, **engine_args):
    llm = LLM(str(path), num_kv_blocks=40, block_size=4, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
            for p in sequential_prompts()]
    llm.engine.core.check_integrity()
    return outs, llm


@pytest.fixture(scope="module")
def cache_off(checkpoints):
    return run_one_by_one(checkpoints["llama_gqa"], enable_prefix_caching=False)[0]


def test_exact_tier_restores_what_was_evicted(checkpoints, cache_off):
    """A tier in the cache's own format copies blocks verbatim: output identical to no cache."""
    outs, llm = run_one_by_one(checkpoints["llama_gqa"], kv_tier_memory="4MiB", kv_tier_dtype="cache")
    assert outs == cache_off
    stats = llm.engine.stats()
    assert stats.kv_tier_stored > 0 and stats.kv_tier_restored > 0
    assert stats.prefix_cache_tier_hits >= 64  # the document's full blocks came back from the tier
    assert stats.kv_blocks_used == 0


def test_without_the_tier_the_document_is_recomputed(checkpoints, cache_off):
    outs, llm = run_one_by_one(checkpoints["llama_gqa"])
    assert outs == cache_off
    stats = llm.engine.stats()
    assert stats.prefix_cache_evictions > 0 and stats.prefix_cache_tier_hits == 0


def test_compressed_tier_keeps_greedy_agreement(checkpoints, cache_off):
    """The CPU tier's int8 store is lossy for an fp32 pool: greedy agreement stays high."""
    outs, llm = run_one_by_one(checkpoints["llama_gqa"], kv_tier_memory="1MiB", kv_tier_dtype="int8")
    assert llm.engine.stats().kv_tier_restored > 0
    pairs = [(a, b) for ref, out in zip(cache_off, outs) for a, b in zip(ref, out)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    assert agreement >= 0.9, agreement


def test_int8_pool_with_its_tier_is_exact(checkpoints):
    """An int8 pool is copied to the tier verbatim (values and scales)."""
    ref, _ = run_one_by_one(checkpoints["llama_gqa"], kv_cache_dtype="int8", enable_prefix_caching=False)
    outs, llm = run_one_by_one(checkpoints["llama_gqa"], kv_cache_dtype="int8", kv_tier_memory="1MiB")
    assert outs == ref and llm.engine.stats().kv_tier_restored > 0


def test_tier_is_skipped_when_recomputing_is_cheaper(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=40, block_size=4, kv_tier_memory="1MiB")
    core = llm.engine.core
    cost = core.scheduler.cost_model
    cost.num_observations = cost.min_observations
    cost.per_token_s = 1e-5
    core.runner.tier_store.restore_s_per_block = 1e-2  # much slower than 4 tokens of prefill
    core._weigh_tier()
    assert not core.kv_manager.restore_from_tier
    core.runner.tier_store.restore_s_per_block = 1e-6
    core._weigh_tier()
    assert core.kv_manager.restore_from_tier


def test_tier_slots_are_lru_and_never_reused_while_read():
    tier = SecondaryTier(2)
    tier.store(block_id=0, block_hash=100)
    tier.store(block_id=1, block_hash=101)
    tier.take_transfers()
    tier.restore(100, block_id=5)  # 100 is read this step: 101 is the one to drop
    tier.store(block_id=2, block_hash=102)
    assert tier.lookup(100) is not None and tier.lookup(101) is None and tier.lookup(102) is not None
    tier.store(block_id=3, block_hash=103)  # 100 is still being read: 102 goes
    assert tier.lookup(102) is None and tier.lookup(103) is not None
    transfers = tier.take_transfers()
    read_slots = {slot for slot, _ in transfers.swap_in}
    assert all(slot not in read_slots for _, slot in transfers.swap_out)
    assert tier.lookup(100) is not None
    tier.check_integrity()


def test_bad_tier_arguments_are_named():
    with pytest.raises(ValueError, match="kv_tier_dtype"):
        LLM("builtin-tiny", kv_tier_memory="1MiB", kv_tier_dtype="fp4")
    with pytest.raises(ValueError, match="kv_tier_memory"):
        LLM("builtin-tiny", kv_tier_memory=10, num_kv_blocks=16)
