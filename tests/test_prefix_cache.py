"""Prefix caching: same tokens with the cache on as off, real reuse, and every block accounted for."""
from __future__ import annotations

import random

import pytest

from hf_models import VOCAB
from punctual import LLM, SamplingParams
from punctual.kv.block_pool import BlockPool, hash_block
from punctual.kv.manager import KVCacheManager
from punctual.request import EngineCoreRequest, Request

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts sharing prefixes of several lengths, some ending mid-block (block size 4 in these tests)."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    system = tokens(37)  # not a multiple of the block size
    document = tokens(16)
    prompts = [system + tokens(rng.randrange(1, 12)) for _ in range(5)]
    prompts += [system + document + tokens(rng.randrange(1, 9)) for _ in range(4)]
    prompts += [system[:20], system[:21], system + document]  # exact block boundary, mid-block, full reuse
    prompts += [tokens(30) for _ in range(3)]  # unrelated
    return prompts


def generate(llm: LLM, prompts, one_by_one: bool = False) -> list[list[int]]:
    batches = [[p] for p in prompts] if one_by_one else [prompts]
    result = []
    for batch in batches:
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False)
        result += [o.outputs[0].token_ids for o in outs]
    llm.engine.core.check_integrity()
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    assert not llm.engine.core.kv_manager.pending
    return result


@pytest.fixture(scope="module")
def reference(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=256, block_size=4, enable_prefix_caching=False)
    return generate(llm, shared_prefix_prompts(), one_by_one=True)


def test_cache_on_sequential_reuses_and_matches(checkpoints, reference):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=256, block_size=4)
    assert generate(llm, shared_prefix_prompts(), one_by_one=True) == reference
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits > 0.4 * stats.prefix_cache_queries
    # Fewer prompt tokens computed than submitted: the shared prefix was not recomputed.
    assert stats.prompt_tokens_computed < stats.prefix_cache_queries - stats.prefix_cache_hits + 20


def test_cache_on_concurrent_sharing_while_computed(checkpoints, reference):
    # All at once with a small budget: later requests wait for the shared prefix being computed.
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=256, block_size=4, max_num_batched_tokens=12)
    assert generate(llm, shared_prefix_prompts()) == reference
    assert llm.engine.stats().prefix_cache_hits > 0


def test_cache_on_under_eviction_and_preemption(checkpoints, reference):
    # 40 blocks of 4: not enough for everything at once, so blocks are evicted and requests preempted.
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=40, block_size=4, max_num_batched_tokens=32)
    assert generate(llm, shared_prefix_prompts()) == reference
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_evictions > 0


def test_n_samples_share_the_prompt_blocks(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=256, block_size=4)
    prompt = {"prompt_token_ids": list(range(1, 42))}
    llm.generate(prompt, SamplingParams(n=4, max_tokens=5, seed=0, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats()
    # One sample computes the 10 full prompt blocks, the other three reuse them.
    assert stats.prefix_cache_hits == 3 * 40
    llm.engine.core.check_integrity()


def test_disabled_cache_never_hits(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=256, block_size=4, enable_prefix_caching=False)
    generate(llm, shared_prefix_prompts()[:4], one_by_one=True)
    assert llm.engine.stats().prefix_cache_hits == 0


def _request(rid, tokens):
    return Request(EngineCoreRequest(rid, tokens, SamplingParams(max_tokens=4)), max_model_len=1000)


def test_lru_eviction_prefers_oldest_then_deepest_block():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = _request("a", [1, 2, 3, 4, 5])  # 2 full blocks + 1 partial
    assert kv.allocate(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    first, second, partial = kv.block_table("a")
    kv.free(a)
    assert kv.pool.num_cached_blocks == 2 and kv.num_free_blocks == 6
    # Three uncached blocks are taken before any cached one; then the deeper cached block goes first.
    taken = kv.pool.allocate(4)
    assert taken[:3] == [3, 4, 5] and taken[3] == partial
    assert kv.pool.num_cached_blocks == 2
    assert kv.pool.allocate(1) == [second] and kv.pool.lookup(hash_block(None, (1, 2))) == first
    assert kv.pool.num_evictions == 1
    kv.pool.check_integrity()


def test_hit_touches_free_cached_block_and_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = _request("a", [1, 2, 3, 4])
    kv.allocate(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    kv.free(a)
    b = _request("b", [1, 2, 3, 4])  # the whole prompt is cached: the last block is recomputed
    hits = kv.computed_prefix(b)
    assert hits.blocks == [kv.pool.lookup(hash_block(None, (1, 2)))] and not hits.tier_hashes
    free_before = kv.num_free_blocks
    assert kv.allocate(b, 4, hits)
    assert kv.num_free_blocks == free_before - 2 and kv.pool.ref_counts[hits.blocks[0]] == 1
    kv.check_integrity()


def test_block_pool_rejects_double_free():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(AssertionError):
        pool.release(blocks)


def test_pinned_prefix_survives_pressure_and_is_reused(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=30, block_size=4)
    core = llm.engine.core
    document = list(range(100, 141))  # 41 tokens: 10 full blocks
    core.pin_prefix("doc", document)
    while core.has_unfinished_requests():
        assert core.step() == []  # the pin's prefill emits nothing
    assert core.pinned_tokens("doc") == 40
    # Fill the pool with unrelated requests: unpinned cached blocks would be evicted.
    rng = random.Random(3)
    llm.generate([{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(30)]} for _ in range(6)],
                 GREEDY, use_tqdm=False)
    hits_before = llm.engine.stats().prefix_cache_hits
    llm.generate({"prompt_token_ids": document + [7, 8, 9]}, GREEDY, use_tqdm=False)
    assert llm.engine.stats().prefix_cache_hits - hits_before == 40
    assert core.unpin_prefix("doc").ok and not core.unpin_prefix("doc").ok
    core.check_integrity()
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0


def test_unpin_while_the_pin_is_computing_cancels_it(checkpoints):
    """The leak the seams issue reproduced: unpinned before its prefill ended, a pin used to
    complete anyway and hold its blocks forever."""
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)
    core = llm.engine.core
    assert core.pin_prefix("doc", list(range(100, 141))).ok
    core.step()  # 8 of 41 tokens computed
    assert core.has_unfinished_requests() and core.kv_manager.num_used_blocks > 0
    assert core.unpin_prefix("doc").ok
    while core.has_unfinished_requests():
        core.step()
    assert core.pinned_tokens("doc") is None
    assert llm.engine.stats().kv_blocks_used == 0
    core.check_integrity()


def test_refused_pins_say_why(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=64, block_size=4, max_model_len=64)
    core = llm.engine.core
    too_long = core.pin_prefix("big", list(range(64)))
    assert not too_long.ok and too_long.status == 400 and "context window is 64" in too_long.error
    assert core.pin_prefix("doc", list(range(10))).ok
    twice = core.pin_prefix("doc", list(range(10)))
    assert not twice.ok and twice.status == 409
    while core.has_unfinished_requests():
        core.step()
    assert core.unpin_prefix("doc").ok
    assert llm.engine.stats().kv_blocks_used == 0
    core.check_integrity()
