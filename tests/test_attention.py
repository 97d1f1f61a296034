"""Paged attention against dense attention, for every way a step lays out its queries: one-token
decodes, short multi-token queries (speculative verification, a draft's catch-up) and prompt
chunks, mixed in one step, with grouped-query heads and with a sliding window."""
from __future__ import annotations

import random
import types

import pytest
import torch

from punctual.models.attention import MAX_SHORT_QUERY, LayerKVCache, paged_attention, quantize_int8
from punctual.runner.runner import PROMPT_SDPA_MIN_ROWS, ModelRunner, TokenChunk, split_by_query_length

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 8, 4


def metadata_builder(window: int | None, attention_kernel: str = "none", batch_invariant: bool = True):
    """The runner's metadata methods on a stand-in holding only what they read. batch_invariant
    (the default here) keeps every token in the kernel where attention_kernel is "all"; without it,
    prompt chunks of PROMPT_SDPA_MIN_ROWS or more attend through SDPA."""
    fake = types.SimpleNamespace(
        arch=types.SimpleNamespace(sliding_window=window, num_heads=HEADS, num_kv_heads=KV_HEADS),
        device=torch.device("cpu"), block_size=BLOCK, attention_kernel=attention_kernel, attention_windows=[window],
        sparse_attention=None, batch_invariant=batch_invariant)
    for name in ("_metadata", "_window_metadata", "_kernel_metadata", "_prefill_metadata", "_prompts_through_sdpa",
                 "_chunk_mask", "_decode_mask", "_pad_index", "_padded_tables"):
        setattr(fake, name, types.MethodType(getattr(ModelRunner, name), fake))
    return fake


def dequantized(x: torch.Tensor) -> torch.Tensor:
    """The values an int8 cache holds for x: [T, KVH, D] in fp32."""
    q, scale = quantize_int8(x)
    return q.float() * scale.unsqueeze(-1)


def dense_reference(q, k, v, start: int, window: int | None) -> torch.Tensor:
    """q: [n, H, D] at positions start..start+n-1; k, v: [start+n, KVH, D]. Returns [n, H*D]."""
    group = HEADS // KV_HEADS
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    q_pos = torch.arange(start, start + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    visible = k_pos <= q_pos
    if window:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", scores, v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_dense_for_mixed_query_lengths(window):
    check_mixed_query_lengths(window, "none", torch.float32, HEAD_DIM, 1e-5)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the specialised loops; 16: the generic one
def test_fused_kernel_attention_matches_dense(window, head_dim):
    """The fused paged-attention kernel (bf16) for every token: decodes, short queries, prompt chunks."""
    from punctual.kernels import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    check_mixed_query_lengths(window, "all", torch.bfloat16, head_dim, 2e-2)


@pytest.mark.parametrize("window", [None, 6])
def test_long_prompt_chunks_attend_through_sdpa_beside_the_kernel(window):
    """Decodes and short queries through the fused kernel, prompt chunks of PROMPT_SDPA_MIN_ROWS
    or more through SDPA, in one step: every token still matches dense attention."""
    from punctual.kernels import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    check_mixed_query_lengths(window, "all", torch.bfloat16, 64, 2e-2, long_chunks=True, batch_invariant=False)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("attention_kernel", ["none", "all"])
def test_int8_cache_attention_matches_dense_over_its_dequantized_values(window, attention_kernel):
    """An int8 cache, read by the torch path (dequantized on gather) or by the fused kernel (its
    specialised loops, head dim 64), against dense attention over the values the cache holds."""
    from punctual.kernels import cpu_kernels

    if attention_kernel != "none" and cpu_kernels.load() is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    check_mixed_query_lengths(window, attention_kernel, torch.bfloat16, 64, 2e-2, quantized=True)


def test_fused_kernel_names_an_int8_cache_it_cannot_read():
    from punctual.kernels import cpu_kernels

    ops = cpu_kernels.load()
    if ops is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    cache = LayerKVCache(4, BLOCK, KV_HEADS, 16, torch.bfloat16, torch.device("cpu"), quantized=True)
    q = torch.zeros(1, HEADS, 16, dtype=torch.bfloat16)
    args = (q, cache.k, cache.v, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long), 0, 0.25)
    assert not cpu_kernels.int8_kv_attention_supported(16, HEADS, KV_HEADS)
    with pytest.raises(RuntimeError, match="int8 caches need head dim 64 or 128"):
        ops.paged_attention(*args, cache.k_scale, cache.v_scale)
    with pytest.raises(RuntimeError, match="need k_scale and v_scale"):
        ops.paged_attention(*args)


def check_mixed_query_lengths(window, attention_kernel: str, dtype: torch.dtype, head_dim: int, tolerance: float,
                              quantized: bool = False, long_chunks: bool = False, batch_invariant: bool = True):
    rng = random.Random(0)
    torch.manual_seed(0)
    # (context already cached, new query tokens): decodes, short queries of several lengths, chunks.
    shapes = [(9, 1), (30, 1), (3, 1), (12, 2), (40, 5), (7, 3), (0, MAX_SHORT_QUERY), (21, 5),
              (0, 23), (17, MAX_SHORT_QUERY + 4)]
    if long_chunks:  # prompt chunks at least PROMPT_SDPA_MIN_ROWS long
        shapes += [(50, PROMPT_SDPA_MIN_ROWS + 6), (0, PROMPT_SDPA_MIN_ROWS)]
    num_blocks = sum(-(-(c + n) // BLOCK) for c, n in shapes) + 1
    cache = LayerKVCache(num_blocks, BLOCK, KV_HEADS, head_dim, dtype, torch.device("cpu"), quantized)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    chunks, full_k, full_v, queries = [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        k = torch.randn(total, KV_HEADS, head_dim).to(dtype)
        v = torch.randn(total, KV_HEADS, head_dim).to(dtype)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached)], dtype=torch.long)
        if cached:
            cache.write(k[:cached], v[:cached], slots)
        chunks.append(TokenChunk([0] * new, cached, table))
        full_k.append(k)
        full_v.append(v)
        queries.append(torch.randn(new, HEADS, head_dim).to(dtype))

    groups = split_by_query_length([c.num_new_tokens for c in chunks], [c.start_position for c in chunks])
    assert all(groups), "the step must mix decodes, short queries and prompt chunks"
    order = [i for group in groups for i in group]
    slot_mapping = torch.tensor([chunks[i].block_table[p // BLOCK] * BLOCK + p % BLOCK for i in order
                                 for p in range(chunks[i].start_position,
                                                chunks[i].start_position + chunks[i].num_new_tokens)])
    positions = torch.tensor([p for i in order for p in range(chunks[i].start_position,
                                                               chunks[i].start_position + chunks[i].num_new_tokens)])
    meta = metadata_builder(window, attention_kernel, batch_invariant)._metadata(
        *[[chunks[i] for i in group] for group in groups], slot_mapping, positions)
    if long_chunks and attention_kernel == "all" and not batch_invariant:  # both paths in this step
        assert 0 < meta.kernel_tokens < len(positions) and meta.prefill_max_q >= PROMPT_SDPA_MIN_ROWS
    q = torch.cat([queries[i] for i in order])
    k_new = torch.cat([full_k[i][chunks[i].start_position:] for i in order])
    v_new = torch.cat([full_v[i][chunks[i].start_position:] for i in order])
    cache.write(k_new, v_new, slot_mapping)
    out = paged_attention(q, k_new, v_new, cache, meta)
    if not (long_chunks and not batch_invariant):
        kernel_tokens = {"none": 0, "all": out.shape[0]}[attention_kernel]
        assert meta.kernel_tokens == kernel_tokens

    row = 0
    for i in order:
        n = chunks[i].num_new_tokens
        k, v = (dequantized(full_k[i]), dequantized(full_v[i])) if quantized else (full_k[i].float(), full_v[i].float())
        expected = dense_reference(queries[i].float(), k, v, chunks[i].start_position, window)
        torch.testing.assert_close(out[row:row + n].float(), expected, atol=tolerance, rtol=tolerance,
                                   msg=lambda m: f"sequence {shapes[i]}: {m}")
        row += n
    assert row == out.shape[0]
