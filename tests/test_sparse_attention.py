"""Quest sparse decode attention: off by default; block summaries are the min/max of the stored
keys however the keys got there; the selection keeps the first and last blocks within the budget;
with a budget covering the context, greedy output equals dense attention."""
from __future__ import annotations

import random

import pytest
import torch

import punctual.models.attention as attention
from hf_models import VOCAB
from punctual import LLM, SamplingParams
from punctual.kernels import cpu_kernels
from punctual.models.attention import AttentionMetadata, LayerKVCache, SparseDecode, paged_attention, quest_select

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def random_prompts(lengths, seed=0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(n)]} for n in lengths]


@pytest.fixture
def selections(monkeypatch):
    """Every layer's selection: (blocks kept per sequence, keys each sees through them, whole
    tables, whole context lengths, blocks kept)."""
    calls, whole_lens = [], {}

    def spy_step(tables, lens, budget_blocks, block_size):
        step = real_step(tables, lens, budget_blocks, block_size)
        whole_lens[id(step)] = lens
        return step

    def spy_choose(q, summaries, step, scale=None):
        chosen = real_choose(q, summaries, step, scale)
        calls.append((chosen, step.context_lens, step.block_tables, whole_lens[id(step)], step.keep))
        return chosen

    real_step, real_choose = attention.quest_step, attention.quest_choose
    monkeypatch.setattr(attention, "quest_step", spy_step)
    monkeypatch.setattr(attention, "quest_choose", spy_choose)
    return calls


def assert_summaries_match_keys(runner, block_ids: list[int], num_tokens: int) -> None:
    """Each full block's summary is the max and min of its keys (a partial block, always attended
    as the last of its sequence, needs none)."""
    bs = runner.block_size
    assert num_tokens >= bs
    for cache in runner.kv_caches:
        for block in block_ids[:num_tokens // bs]:
            keys = cache.k[block].float()
            if cache.quantized:
                keys = keys * cache.k_scale[block].unsqueeze(-1)
            keys = keys.to(cache.summaries.dtype)
            dim = keys.shape[-1]
            assert torch.equal(cache.summaries[:, block, :dim], keys.amax(0)), block
            assert torch.equal(cache.summaries[:, block, dim:], keys.amin(0)), block


# ---- off by default ------------------------------------------------------------------------
def test_off_by_default_keeps_no_summaries_and_refuses_the_field():
    llm = LLM("builtin-tiny", num_kv_blocks=32)
    runner = llm.engine.core.runner
    assert runner.sparse_attention is None and all(c.summaries is None for c in runner.kv_caches)
    with pytest.raises(ValueError, match="sparse_attention"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, sparse_attention=True),
                     use_tqdm=False)
    # Asking for dense explicitly is always fine.
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, sparse_attention=False),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("kwargs,field", [(dict(sparse_attention="h2o"), "sparse_attention"),
                                          (dict(sparse_attention="quest", sparse_token_budget=16),
                                           "sparse_token_budget"),
                                          (dict(sparse_min_context=0), "sparse_min_context")])
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LLM("builtin-tiny", num_kv_blocks=32, **kwargs)


def test_field_must_be_a_bool():
    with pytest.raises(ValueError, match="sparse_attention"):
        SamplingParams(sparse_attention="yes")


# ---- the selection ---------------------------------------------------------------------------
def brute_force_selection(q, summaries, table, context_len, budget_blocks, block_size, scale):
    """One sequence, in loops: the block ids kept, in position order."""
    num_blocks = -(-context_len // block_size)
    if num_blocks <= budget_blocks:
        return table[:num_blocks].tolist()
    num_heads, kv_heads, dim = q.shape[0], summaries.shape[0], q.shape[1]
    group = num_heads // kv_heads
    upper = torch.empty(num_heads, num_blocks)
    for h in range(num_heads):
        for b in range(num_blocks):
            high, low = summaries[h // group, table[b], :dim], summaries[h // group, table[b], dim:]
            upper[h, b] = torch.maximum(q[h] * high, q[h] * low).sum()
    # The last block (kept anyway, maybe partial) stays out of the softmax; ties go to the earlier block.
    score = torch.softmax(upper[:, :-1] * scale, dim=-1).sum(0)
    others = sorted(range(1, num_blocks - 1), key=lambda b: (-score[b], b))[:budget_blocks - 2]
    return [table[b].item() for b in sorted([0, num_blocks - 1, *others])]


def test_selection_keeps_first_and_last_within_budget_as_brute_force():
    torch.manual_seed(0)
    block_size, budget_blocks, heads, kv_heads, dim = 4, 5, 6, 2, 8
    pool = 64
    pairs = torch.randn(kv_heads, pool, 2, dim)
    summaries = torch.cat((pairs.amax(2), pairs.amin(2)), dim=-1)  # max >= min
    lens = torch.tensor([9, 30, 80, 21, 47])  # 3 blocks (under budget), 8, 20, 6, 12
    width = int(-(-lens.max() // block_size))
    tables = torch.stack([torch.randperm(pool)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, dim)
    scale = dim ** -0.5
    chosen, chosen_lens = quest_select(q, summaries, tables, lens, budget_blocks, block_size, scale)
    assert chosen.shape == (len(lens), budget_blocks)
    for i, length in enumerate(lens.tolist()):
        expected = brute_force_selection(q[i], summaries, tables[i], length, budget_blocks, block_size, scale)
        kept = chosen[i, :len(expected)].tolist()
        assert kept == expected
        num_blocks = -(-length // block_size)
        assert kept[0] == tables[i, 0] and kept[-1] == tables[i, num_blocks - 1]
        # The keys seen: the kept blocks in full but the last, which keeps its own fill.
        assert chosen_lens[i] == (len(kept) - 1) * block_size + (length - 1) % block_size + 1
        assert chosen_lens[i] <= budget_blocks * block_size


def test_sparse_attention_is_dense_attention_over_the_chosen_blocks():
    """Through PyTorch (and the fused kernel where it loads): each sparse decode's output is exact
    attention over the keys of the blocks the selection kept, nothing else."""
    torch.manual_seed(1)
    block_size, heads, kv_heads, dim, pool = 4, 4, 2, 16, 40
    lens = [37, 22]
    paths = [(torch.float32, False)] + ([(torch.bfloat16, True)] if cpu_kernels.load() is not None else [])
    for dtype, kernel in paths:
        cache = LayerKVCache(pool, block_size, kv_heads, dim, dtype, torch.device("cpu"), summaries=True)
        tables = torch.stack([torch.randperm(pool)[:10] for _ in lens])
        slots = torch.cat([tables[i, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                           for i, n in enumerate(lens)])
        cache.write(torch.randn(len(slots), kv_heads, dim, dtype=dtype), torch.randn(len(slots), kv_heads, dim,
                                                                                      dtype=dtype), slots)
        cache.summarize(tables.flatten().unique())
        q = torch.randn(len(lens), heads, dim, dtype=dtype)
        context = torch.tensor(lens)
        sparse = SparseDecode(0, len(lens), tables, context, budget_blocks=3)
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(lens),
                                 decode_buckets=[], prefill_block_tables=None, prefill_mask=None,
                                 prefill_pad_index=None, prefill_max_q=0, prefill_fresh_causal=False, sparse=sparse)
        if kernel:
            meta.kernel_tokens, meta.kernel_block_tables = len(lens), tables
            meta.kernel_seq_of_token, meta.kernel_positions = torch.arange(len(lens)), context - 1
        out = paged_attention(q, None, None, cache, meta)
        chosen, chosen_lens = quest_select(q, cache.summaries, tables, context, 3, block_size)
        for i in range(len(lens)):
            k, v = cache.gather(chosen[i:i + 1])
            n = int(chosen_lens[i])
            k, v = k[0, :, :n].float(), v[0, :, :n].float()  # [KVH, n, D]
            group = heads // kv_heads
            scores = torch.einsum("hd,hnd->hn", q[i].float(), k.repeat_interleave(group, 0)) * dim ** -0.5
            expected = torch.einsum("hn,hnd->hd", scores.softmax(-1), v.repeat_interleave(group, 0))
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[i].float().view(heads, dim), expected, atol=tolerance, rtol=tolerance)


needs_kernels = pytest.mark.skipif(cpu_kernels.load() is None, reason="the fused CPU kernels do not build here")


def random_selection_case(seed, lens, width, heads, kv_heads, dim, pool, ties=False):
    """bf16 queries and summaries (max >= min) over random tables; with `ties`, every block's
    summary the same, so that every score ties and the earlier blocks must win."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randn(kv_heads, 1 if ties else pool, 2, dim, generator=g).expand(kv_heads, pool, 2, dim)
    summaries = torch.cat((pairs.amax(2), pairs.amin(2)), dim=-1).to(torch.bfloat16).contiguous()
    tables = torch.stack([torch.randperm(pool, generator=g)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, dim, generator=g).to(torch.bfloat16)
    return q, summaries, tables, torch.tensor(lens)


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads,dim,block_size,budget,ties", [
    (4, 2, 64, 16, 8, False), (9, 3, 64, 16, 4, False), (6, 2, 32, 4, 5, False), (8, 1, 128, 8, 2, False),
    (4, 2, 64, 16, 6, True)])
def test_kernel_selection_is_the_references(heads, kv_heads, dim, block_size, budget, ties):
    """The fused kernel's selection (csrc/quest.h, what decode_stack runs in every layer) is
    quest_select's: the same blocks, in the same order, and the same keys seen; a tie goes to the
    earlier block in both."""
    ops = cpu_kernels.load()
    lens = [1, 3 * block_size, 20 * block_size + 3, 70 * block_size, 9 * block_size - 1]  # within the budget, and not
    width = -(-max(lens) // block_size)
    q, summaries, tables, context = random_selection_case(7, lens, width, heads, kv_heads, dim, pool=200, ties=ties)
    scale = dim ** -0.5
    expected = quest_select(q, summaries, tables, context, budget, block_size, scale)
    got = ops.quest_select(q, summaries, tables, context, budget, block_size, scale)
    assert torch.equal(got[1], expected[1])
    for i, n in enumerate(context.tolist()):  # past its own blocks a short table holds any block
        kept = min(budget, -(-n // block_size))
        assert torch.equal(got[0][i, :kept], expected[0][i, :kept]), i
    if ties:  # the first budget - 1 blocks and the last
        assert got[0][3].tolist() == tables[3, :budget - 1].tolist() + [tables[3, 69].item()]
    # Strided q rows (decode_stack hands the kernel its rows of the fused qkv) select the same.
    wide = torch.cat((q.view(len(lens), -1), torch.zeros(len(lens), 3 * dim, dtype=q.dtype)), dim=1)
    strided = wide[:, :heads * dim].view(len(lens), heads, dim)
    assert torch.equal(ops.quest_select(strided, summaries, tables, context, budget, block_size, scale)[0], got[0])


# ---- end to end ------------------------------------------------------------------------------
def sparse_stack_steps(llm) -> list[int]:
    """Wraps the whole-stack kernel's runner: the number of sparse decodes of each step it took."""
    model = llm.engine.core.runner.model
    run_stack, steps = model._run_stack, []

    def counted(input_ids, positions, meta, kv_caches):
        hidden = run_stack(input_ids, positions, meta, kv_caches)
        if hidden is not None and meta.sparse is not None:
            steps.append(meta.sparse.end - meta.sparse.start)
        return hidden

    model._run_stack = counted
    return steps


@pytest.mark.parametrize("model,dtype", [("llama_gqa", "float32"), ("llama_head64", "bfloat16")])
def test_budget_covering_the_context_equals_dense(checkpoints, selections, model, dtype):
    """Requests whose contexts fit the budget, decoded in the same steps as one that does not:
    they go through the selection (which keeps all their blocks) and give dense output exactly.
    float32 through PyTorch; bf16 with head dim 64 through the whole-stack kernel where the
    kernels build (it selects in C++)."""
    prompts = random_prompts([400, 150, 60, 20])
    dense = LLM(str(checkpoints[model]), dtype=dtype, num_kv_blocks=96, max_num_batched_tokens=64)
    quest = LLM(str(checkpoints[model]), dtype=dtype, num_kv_blocks=96, max_num_batched_tokens=64,
                sparse_attention="quest", sparse_token_budget=256, sparse_min_context=32)
    stack_steps = sparse_stack_steps(quest) if quest.engine.core.runner.model._stack is not None else None
    expected = [o.outputs[0].token_ids for o in dense.generate(prompts, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in quest.generate(prompts, GREEDY, use_tqdm=False)]
    assert got[1:] == expected[1:]
    assert len(set(map(tuple, expected))) > 1 and len(set(expected[1])) > 1  # not a degenerate model
    # The sparse path ran beside the long prompt, for the three prompts past sparse_min_context.
    if stack_steps is None:
        assert selections and max(len(lens) for _, _, _, lens, _ in selections) == 3
    else:
        assert stack_steps and max(stack_steps) == 3
    quest.engine.core.check_integrity()


@needs_kernels
def test_whole_stack_kernel_selects_as_the_pytorch_reference(checkpoints):
    """bf16 decodes that leave blocks out, through the whole-stack kernel (selection in C++): each
    step's hidden states are those of the layer-by-layer path (the fused kernels, the selection
    in PyTorch) bit for bit, and the greedy tokens those of a server without the whole-stack kernel."""
    prompts = random_prompts([300, 170, 90], seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    kwargs = dict(dtype="bfloat16", num_kv_blocks=96, block_size=16, sparse_attention="quest",
                  sparse_token_budget=64, sparse_min_context=64)
    fused = LLM(str(checkpoints["llama_head64"]), **kwargs)
    model = fused.engine.core.runner.model
    assert model._stack is not None
    run_stack, compared = model._run_stack, []

    def stack_and_layers(input_ids, positions, meta, kv_caches):
        hidden = run_stack(input_ids, positions, meta, kv_caches)
        if hidden is not None and meta.sparse is not None:
            assert torch.equal(hidden, model._forward_fused(input_ids, positions, meta, kv_caches))
            compared.append(meta.sparse.end - meta.sparse.start)
        return hidden

    model._run_stack = stack_and_layers
    got = [o.outputs[0].token_ids for o in fused.generate(prompts, params, use_tqdm=False)]
    assert compared and max(compared) == 3  # all three leave blocks out (a budget of 4 blocks)
    layered = LLM(str(checkpoints["llama_head64"]), decode_stack=False, **kwargs)
    assert got == [o.outputs[0].token_ids for o in layered.generate(prompts, params, use_tqdm=False)]


def test_contexts_within_the_budget_attend_densely(checkpoints, selections):
    prompts = random_prompts([150, 60])
    dense = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=64)
    quest = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=64, sparse_attention="quest", sparse_token_budget=512,
                sparse_min_context=32)
    assert ([o.outputs[0].token_ids for o in quest.generate(prompts, GREEDY, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in dense.generate(prompts, GREEDY, use_tqdm=False)])
    assert not selections  # no block to leave out: the whole-stack kernel's path where it runs


def test_small_budget_attends_to_at_most_the_budget(checkpoints, selections):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=64, block_size=16, sparse_attention="quest",
              sparse_token_budget=48, sparse_min_context=64)
    out = llm.generate(random_prompts([200]), GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
    assert len(selections) == GREEDY.max_tokens * 2 - 2  # every decode step but the first, in both layers
    for chosen, chosen_lens, tables, lens, budget in selections:
        assert budget == 3 and chosen.shape[1] == 3
        assert chosen[0, 0] == tables[0, 0] and chosen[0, -1] == tables[0, (lens[0] - 1) // 16]
        assert chosen_lens[0] <= 48 and chosen_lens[0] % 16 == lens[0] % 16


def test_request_field_turns_it_off(checkpoints, selections):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=64, sparse_attention="quest", sparse_token_budget=48,
              sparse_min_context=32)
    off = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, sparse_attention=False)
    llm.generate(random_prompts([100]), off, use_tqdm=False)
    assert not selections
    # In one batch: a long request that turned it off, a shorter one that did not (the default).
    llm.engine.add_request("off", random_prompts([130])[0], off)
    llm.engine.add_request("on", random_prompts([100], seed=1)[0], SamplingParams(temperature=0, max_tokens=4,
                                                                                   ignore_eos=True))
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert selections
    for _, _, _, lens, _ in selections:  # only the one that did not turn it off, at its own context
        assert lens.tolist() in ([101], [102], [103])


# ---- summaries ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model,dtype,kv_cache_dtype,min_context", [
    ("llama_gqa", "float32", "auto", 16), ("llama_gqa", "float32", "int8", 16),
    # Dense decodes of a bf16 model: the whole-stack kernel writes the keys.
    ("llama_head64", "bfloat16", "auto", 4096)])
def test_summaries_are_min_max_of_stored_keys(checkpoints, model, dtype, kv_cache_dtype, min_context):
    """After a prompt in chunks that end mid-block and decode steps that fill blocks one key at a
    time (through the whole-stack kernel in bf16 where it loads); and for a second request whose
    prefix came from the prefix cache."""
    llm = LLM(str(checkpoints[model]), dtype=dtype, num_kv_blocks=64, block_size=8, max_num_batched_tokens=13,
              sparse_attention="quest", sparse_min_context=min_context, kv_cache_dtype=kv_cache_dtype)
    engine, runner = llm.engine, llm.engine.core.runner
    prompts = random_prompts([45, 45])
    prompts[1]["prompt_token_ids"][:40] = prompts[0]["prompt_token_ids"][:40]
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        request = None
        for _ in range(40):
            engine.step()
            request = next((r for r in engine.core.scheduler.running if r.request_id == f"r{index}"), None)
            if request is not None and request.num_computed_tokens >= 45 + 6:
                break
        assert request is not None, "the request finished before it was checked"
        if index == 1:
            assert request.num_cached_tokens == 40  # five full blocks from the first request
        assert_summaries_match_keys(runner, runner.requests[f"r{index}"].block_ids, request.num_computed_tokens)
        while engine.has_unfinished_requests():
            engine.step()


def test_blocks_restored_from_the_tier_are_summarized(checkpoints):
    """A document evicted to the CPU tier and restored on a hit: its blocks' summaries are
    recomputed from the restored keys (the pool's blocks were reused in between)."""
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=40, block_size=4, kv_tier_memory="4MiB",
              kv_tier_dtype="cache", sparse_attention="quest", sparse_token_budget=8, sparse_min_context=8)
    rng = random.Random(11)
    doc = [rng.randrange(VOCAB) for _ in range(72)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for prompt in [doc] + [[rng.randrange(VOCAB) for _ in range(60)] for _ in range(5)]:
        llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    engine, runner = llm.engine, llm.engine.core.runner
    engine.add_request("again", {"prompt_token_ids": doc + [1, 2, 3]}, params)
    engine.step()
    assert engine.stats().prefix_cache_tier_hits > 0
    assert_summaries_match_keys(runner, runner.requests["again"].block_ids, 72)
    while engine.has_unfinished_requests():
        engine.step()
    llm.engine.core.check_integrity()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_blocks_received_from_a_peer_are_summarized(kv_cache_dtype):
    """KV written into the pool by a move (disaggregated prefill, migration) gets its summaries
    from the keys it brings: the sender need not carry them."""
    from punctual.plan import KVCopyOrders
    from punctual.runner.kv_transfer import read_blocks

    def runner():
        return LLM("builtin-tiny", num_kv_blocks=16, block_size=4, sparse_attention="quest",
                   sparse_token_budget=8, kv_cache_dtype=kv_cache_dtype).engine.core.runner

    sender, receiver = runner(), runner()
    torch.manual_seed(2)
    for cache in sender.kv_caches:
        cache.write(torch.randn(8, *cache.k.shape[2:]), torch.randn(8, *cache.k.shape[2:]), torch.arange(4, 12))
    payload = read_blocks(sender.kv_caches, [1, 2], kv_cache_dtype == "int8")
    receiver.copy_kv(KVCopyOrders(writes=[((5, 9), payload)]))
    assert_summaries_match_keys(receiver, [5, 9], 8)
    assert all(bool(cache.summaries[:, [5, 9]].any()) for cache in receiver.kv_caches)
