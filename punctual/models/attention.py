"""Paged attention (torch reference): K and V are read through each sequence's block table.

The batch is split in two groups, each handled by vectorised calls, never a loop over
sequences: single-token queries (decodes) and multi-token chunks (prefills). Decodes are sorted
by context length and cut into a few buckets (at most MAX_DECODE_BUCKETS), each padded only to
its own longest context: with long-tailed lengths, one padded batch would gather several times
the KV that exists. Tokens are laid out decodes first, so the outputs concatenate in token order.

Decodes hand SDPA their query heads grouped by KV head (see decode_attention): PyTorch's CPU
flash-attention kernel with enable_gqa took 7.4 ms a layer for 16 sequences x 1,104 tokens in
bf16, and 1.0 ms with the same numbers grouped.

Short queries of 2..MAX_SHORT_QUERY tokens (speculative verification, a draft model's catch-up)
get buckets of their own, padded to the longest query of the bucket, never to a prompt chunk
that shares the step: padded with a 100-token chunk, 20 verifications of 5 tokens took 13.5 ms
a layer instead of well under 1.

Sparse decodes (Quest, Tang et al. 2024): each KV block keeps the element-wise max and min of its
keys per KV head (LayerKVCache.summaries, written by the step whose keys fill the block). A
decode scores each block by the upper bound of q.k those give, sum_d max(q_d * max_d, q_d * min_d),
keeps its first and last blocks and the best others up to a token budget, and attends over that
shortened block table with the same kernels as a dense decode (keys are stored rotated).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


MAX_DECODE_BUCKETS = 4
MAX_SHORT_QUERY = 16


@dataclass
class DecodeBucket:
    """Sequences of similar context length with short queries, padded to the longest context of
    the bucket (not of the whole batch) and to the longest query of the bucket.

    q_len 1: decodes, one token each, no padding. q_len > 1: each sequence's query is padded to
    q_len rows (pad_index says where its tokens go), and the mask has G * q_len rows, already
    repeated for the G query heads that share a KV head (see short_query_attention).
    """

    start: int  # first token of the bucket in the step's token order
    end: int
    block_tables: torch.Tensor  # [n, max_blocks] long
    # Builds the [n, 1, G * q_len (1 for decodes), ctx] bool mask (True where a key is visible).
    # Called by the first layer that attends and kept for the others: the mask is the attention
    # kernel's own work (a fused paged-attention kernel takes the lengths), O(n * ctx) elements.
    build_mask: Callable[[], torch.Tensor]
    q_len: int = 1
    pad_index: torch.Tensor | None = None  # [end - start] long: row of each token in the [n * q_len] padding
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = self.build_mask()
        return self._mask


@dataclass
class SparseDecode:
    """Decode tokens start..end (one-token queries, one sequence each, laid out after the dense
    decodes) that attend over the blocks quest_select picks in each full-attention layer."""

    start: int
    end: int
    block_tables: torch.Tensor  # [end - start, max_blocks] long: their whole tables
    context_lens: torch.Tensor  # [end - start] long: keys each token sees (its position + 1)
    budget_blocks: int  # blocks attended at most (the token budget // block size, >= 2)
    # Built by the first layer that selects, kept for the others (quest_step; None: all kept).
    _step: QuestStep | None = field(default=None, repr=False)
    _stepped: bool = field(default=False, repr=False)
    _kernel_positions: torch.Tensor | None = field(default=None, repr=False)

    def step(self, block_size: int) -> QuestStep | None:
        if not self._stepped:
            self._step = quest_step(self.block_tables, self.context_lens, self.budget_blocks, block_size)
            self._stepped = True
        return self._step

    def kernel_positions(self, positions: torch.Tensor, step: QuestStep) -> torch.Tensor:
        """The kernel's positions with each sparse token's last key where its kept blocks end."""
        if self._kernel_positions is None:
            self._kernel_positions = positions.clone()
            self._kernel_positions[self.start:self.end] = step.context_lens - 1
        return self._kernel_positions


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    num_decode_tokens: int  # the first tokens are short queries (decode buckets); prompt chunks follow
    decode_buckets: list[DecodeBucket]
    prefill_block_tables: torch.Tensor | None  # [Bp, max_blocks] long
    prefill_mask: torch.Tensor | None  # [Bp, 1, max_q, ctx] bool
    prefill_pad_index: torch.Tensor | None  # [Tp] long: row of each prefill token in the [Bp*max_q] padding
    prefill_max_q: int
    # One prompt from position 0: attend to the chunk's own K/V with a causal mask, no gather.
    prefill_fresh_causal: bool
    # The first `kernel_tokens` tokens attend through the fused kernel (torch.ops.punctual.
    # paged_attention), each over its own context read through its sequence's block table. Where the
    # kernel runs (bf16 or an int8 cache on CPU), that is every token of the step and no bucket is
    # built; elsewhere (fp32, CUDA) none.
    kernel_tokens: int = 0
    kernel_block_tables: torch.Tensor | None = None  # [S, max_blocks] long
    kernel_seq_of_token: torch.Tensor | None = None  # [kernel_tokens] long: row of kernel_block_tables
    kernel_positions: torch.Tensor | None = None  # [kernel_tokens] long
    kernel_window: int = 0  # sliding window (0: none)
    window: int | None = None  # the sliding window these masks and tables were built for (None: full)
    # Decodes that attend sparsely (Quest) in these layers; None: every token attends densely. Only
    # full-attention metadata carries it (a sliding window is short already).
    sparse: SparseDecode | None = None
    # Blocks this step's keys fill ([U] long; None where no cache keeps summaries): their summaries
    # are written after the keys, in every layer.
    filled_blocks: torch.Tensor | None = None
    # A model with both full and sliding-window layers (Gemma 2/3): the metadata of its sliding
    # layers; this one is then its full layers'.
    local: "AttentionMetadata | None" = None

    def for_window(self, window: int | None) -> "AttentionMetadata":
        """The metadata of a layer with this attention window."""
        if window == self.window or self.local is None:
            return self
        return self.local


class LayerKVCache:
    """One layer's paged K and V: [num_blocks, block_size, kv_heads, head_dim].

    With `quantized`, K and V are stored as int8 with one float32 scale per token and head
    (absmax / 127 over the head dimension, in the direction of KIVI and CacheGen), so the pool
    holds about 2x (vs bf16) or 4x (vs fp32) the tokens; they are dequantized when gathered.
    """

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, quantized: bool = False, summaries: bool = False):
        """`summaries`: keep each block's key max and min for sparse decode attention:
        [kv_heads, num_blocks, 2 * head_dim] in the model dtype, the max's dims first. KV head
        major, so a step's selection gathers [kv_heads, blocks, 2 * head_dim] rows in one call
        and multiplies them with no transpose (block major, the permute before
        the matmul copies: about 3x slower for 16 sequences of 512 blocks)."""
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.dtype = dtype
        self.quantized = quantized
        # Zeroed, not empty: masked-out slots must hold finite numbers (0 * NaN is NaN).
        store = torch.int8 if quantized else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        if quantized:
            self.k_scale = torch.zeros(shape[:3], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:3], dtype=torch.float32, device=device)
        self.summaries = (torch.zeros((kv_heads, num_blocks, 2 * head_dim), dtype=dtype, device=device)
                          if summaries else None)

    @staticmethod
    def summary_bytes_per_block(kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @staticmethod
    def bytes_per_token(kv_heads: int, head_dim: int, dtype: torch.dtype, quantized: bool) -> int:
        if quantized:
            return 2 * kv_heads * (head_dim + 4)  # int8 values + a float32 scale per head
        return 2 * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new keys/values [T, kv_heads, head_dim] at their cache slots."""
        kv_heads, head_dim = k.shape[1], k.shape[2]
        if not self.quantized:
            self.k.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
            self.v.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)
            return
        for values, cache, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, scale = quantize_int8(values)
            cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, q)
            scales.view(-1, kv_heads).index_copy_(0, slot_mapping, scale)

    def summarize(self, block_ids: torch.Tensor) -> None:
        """Write the summaries of these full blocks ([U] long) from their stored keys: the max and
        min of each dim per KV head. A partial block needs none: it is the last block of its
        sequence, which a sparse decode always attends to."""
        if self.summaries is None or not block_ids.numel():
            return
        keys = self.k[block_ids]  # [U, block_size, kv_heads, head_dim]
        if self.quantized:
            keys = keys.to(torch.float32) * self.k_scale[block_ids].unsqueeze(-1)
        keys = keys.to(self.summaries.dtype)
        bounds = torch.cat((keys.amax(dim=1), keys.amin(dim=1)), dim=-1)  # [U, kv_heads, 2 * head_dim]
        self.summaries[:, block_ids] = bounds.transpose(0, 1)

    def gather(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nb] block tables -> K, V as [B, kv_heads, nb*block_size, head_dim] in the model dtype."""
        return self._gather(self.k, block_tables, "k_scale"), self._gather(self.v, block_tables, "v_scale")

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor, scale_name: str) -> torch.Tensor:
        batch, num_blocks = block_tables.shape
        _, block_size, kv_heads, head_dim = cache.shape
        flat_ids = block_tables.reshape(-1)
        # index_select over whole blocks is a row memcpy: about 5x faster than advanced indexing.
        gathered = torch.index_select(cache.view(cache.shape[0], -1), 0, flat_ids)
        if self.quantized:
            scale = torch.index_select(getattr(self, scale_name).view(cache.shape[0], -1), 0, flat_ids)
            gathered = (gathered.view(-1, head_dim).to(torch.float32) * scale.view(-1, 1)).to(self.dtype)
        return gathered.view(batch, num_blocks * block_size, kv_heads, head_dim).transpose(1, 2)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, D] -> int8 values and a float32 scale per (token, head)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(x32 / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


@dataclass
class QuestStep:
    """What a step's selection needs that is the same in every layer (built once a step)."""

    block_tables: torch.Tensor  # [m, W] long
    flat_ids: torch.Tensor  # [m * W] long: the tables' block ids in a row
    keep: int  # blocks kept per sequence, < W
    bias: torch.Tensor  # [m, 1, W] float32: 0 for the sequence's blocks, -inf past its end (before the softmax)
    force: torch.Tensor  # [m, W] float32: +inf for the first and last blocks, -1 past the end, else 0
    context_lens: torch.Tensor  # [m] long: the keys each query sees through the kept blocks


def quest_step(block_tables: torch.Tensor, context_lens: torch.Tensor, budget_blocks: int,
               block_size: int) -> QuestStep | None:
    """None where every sequence fits the budget (each keeps its table as it is)."""
    width = block_tables.shape[1]
    keep = min(width, budget_blocks)
    if keep == width:
        return None
    num_blocks = (context_lens + block_size - 1) // block_size  # [m]
    columns = torch.arange(width, device=block_tables.device)[None, :]
    past_end = columns >= num_blocks[:, None]  # [m, W]
    bias = torch.zeros(past_end.shape, dtype=torch.float32, device=block_tables.device).masked_fill_(past_end, -torch.inf)
    force = torch.zeros_like(bias).masked_fill_(past_end, -1.0)  # below every real block (scores are >= 0)
    force[:, 0] = torch.inf
    force.scatter_(1, (num_blocks - 1)[:, None], torch.inf)
    # The last block stays out of the softmax where blocks are left out: kept anyway, and a partial
    # block has no summary yet (its slot holds a stale one, or one this step's keys have not
    # updated where the fused kernel writes summaries after the step).
    bias.masked_fill_((columns == (num_blocks - 1)[:, None]) & (num_blocks > keep)[:, None], -torch.inf)
    lens = (torch.clamp(num_blocks, max=keep) - 1) * block_size + (context_lens - 1) % block_size + 1
    return QuestStep(block_tables, block_tables.reshape(-1), keep, bias[:, None, :], force, lens)


def quest_choose(q: torch.Tensor, summaries: torch.Tensor, step: QuestStep, scale: float | None = None) -> torch.Tensor:
    """One layer's kept blocks: [m, keep] block ids in position order, the last block last.

    q: [m, H, D]; summaries: [KVH, num_blocks, 2D] (each block's key max, then min). Each block's
    upper bound of q.k per query head is sum_d max(q_d * max_d, q_d * min_d) = q+ . max + q- . min
    (one matmul in the summaries' dtype); per head the bounds go through a softmax over the
    sequence's blocks (heads weigh alike, whatever their scale) and a block's score is the sum
    over the heads, as one table serves every head of the sequence. The first and last (partial)
    blocks are always kept, then the best others, a tie to the earlier block. The fused kernel
    (csrc/quest.h, inside decode_stack) computes the same, rounding where this rounds."""
    m, num_heads, head_dim = q.shape
    kv_heads, width = summaries.shape[0], step.block_tables.shape[1]
    q = q * (head_dim ** -0.5 if scale is None else scale)  # the softmax's scale, on the few query rows
    grouped = q.view(m, kv_heads, num_heads // kv_heads, head_dim).transpose(0, 1)  # [KVH, m, G, D]
    signed = torch.cat((grouped.clamp(min=0), grouped.clamp(max=0)), dim=-1).to(summaries.dtype)  # pairs (max, min)
    bounds = summaries.index_select(1, step.flat_ids).view(kv_heads, m, width, 2 * head_dim)
    upper = torch.matmul(bounds, signed.transpose(-1, -2))  # [KVH, m, W, G]
    upper = upper.transpose(2, 3).to(torch.float32) + step.bias  # [KVH, m, G, W]: softmax along rows
    score = torch.softmax(upper, dim=-1).sum(dim=(0, 2)) + step.force  # [m, W]
    # The best `keep`, a tie to the earlier block (a stable sort; topk's order among ties is
    # unspecified), as the fused kernel breaks it (csrc/quest.h). Past-the-end ones sort last.
    best = score.sort(dim=1, descending=True, stable=True).indices[:, :step.keep]
    chosen = best.sort(dim=1).values
    return step.block_tables.gather(1, chosen)


def quest_select(q: torch.Tensor, summaries: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 budget_blocks: int, block_size: int, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each one-token query attends over (Quest), as a shortened table: the first and
    last blocks, then the best bounded others (quest_choose), up to budget_blocks in all.
    block_tables: [m, W] long; context_lens: [m] long. Sequences of at most budget_blocks blocks
    keep their tables as they are.

    Returns (tables [m, min(W, budget_blocks)], context_lens [m]): the kept blocks, the last one
    last, and the keys a query sees through them.
    """
    step = quest_step(block_tables, context_lens, budget_blocks, block_size)
    if step is None:
        return block_tables, context_lens
    return quest_choose(q, summaries, step, scale), step.context_lens


def decode_mask(context_lens: torch.Tensor, context: int, window: int | None) -> torch.Tensor:
    """[n, 1, 1, context] bool: a one-token query with context_lens[i] keys (a [n] long tensor) sees
    keys 0 .. context_lens[i] - 1, the last `window` of them with a sliding window."""
    key_pos = torch.arange(context, device=context_lens.device)[None, :]
    lens = context_lens[:, None]
    visible = key_pos < lens
    if window:
        visible &= key_pos > lens - 1 - window
    return visible[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           is_causal: bool = False, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """SDPA over [..., heads, q, D] x [..., kv_heads, ctx, D] (query heads grouped onto KV heads, as
    repeat_kv does), or, with soft-capped scores (Gemma 2), transformers' eager attention:
    scores * scale -> cap * tanh(scores / cap) -> mask -> softmax in float32 -> @ v."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[-3] != k.shape[-3])
    if q.shape[-3] != k.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence. q: [n, H, D]; k, v: [n, KVH, ctx, D]; mask: [n, 1, 1, ctx] bool.

    The G = H / KVH query heads that share a KV head (GQA) go in as G query rows of that KV
    head, so each K/V row is read once per KV head; query head h reads KV head h // G, as in
    transformers' repeat_kv. The same kernel as SDPA with enable_gqa (scores and softmax in
    float32), equal to rounding, and about 7x faster on CPU for one-row queries. Returns [n, H, D].
    """
    n, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.view(n, kv_heads, num_heads // kv_heads, head_dim)
    return attend(grouped, k, v, mask, scale=scale, softcap=softcap).view(n, num_heads, head_dim)


def short_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bucket: DecodeBucket,
                          scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """A few query tokens per sequence, grouped by KV head like decode_attention.

    q: [tokens, H, D] in bucket order; k, v: [n, KVH, ctx, D]. The query of each sequence is
    padded to q_len rows; query head h = kv * G + g becomes row g * q_len + i of KV head kv,
    which is the row order of bucket.mask. Returns [tokens, H * D].
    """
    _, num_heads, head_dim = q.shape
    n, kv_heads = k.shape[0], k.shape[1]
    q_len = bucket.q_len
    padded = q.new_zeros(n * q_len, num_heads, head_dim)
    padded[bucket.pad_index] = q
    grouped = padded.view(n, q_len, num_heads, head_dim).transpose(1, 2).reshape(
        n, kv_heads, num_heads // kv_heads * q_len, head_dim)
    out = attend(grouped, k, v, bucket.mask, scale=scale, softcap=softcap)
    out = out.view(n, num_heads, q_len, head_dim).transpose(1, 2).reshape(n * q_len, num_heads * head_dim)
    return out[bucket.pad_index]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                    meta: AttentionMetadata, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (already written to the cache). Returns [T, H*D]. `scale`:
    the softmax scale (default head_dim ** -0.5); `softcap`: Gemma 2's cap on the scores (not in
    the fused kernel, whose models attend through PyTorch)."""
    num_tokens, num_heads, head_dim = q.shape
    parts = []
    nd = meta.num_decode_tokens
    sparse = meta.sparse if cache.summaries is not None else None
    step = selected = None
    if sparse is not None:
        step = sparse.step(cache.k.shape[1])
        selected = ((sparse.block_tables, sparse.context_lens) if step is None else
                    (quest_choose(q[sparse.start:sparse.end], cache.summaries, step, scale), step.context_lens))
    if meta.kernel_tokens:
        n = meta.kernel_tokens
        tables, positions = meta.kernel_block_tables, meta.kernel_positions
        if step is not None:  # decode i is sequence i: their rows of the tables, their positions
            tables = tables.clone()
            tables[sparse.start:sparse.end, :step.keep] = selected[0]
            positions = sparse.kernel_positions(positions, step)
        parts.append(torch.ops.punctual.paged_attention(
            q[:n], cache.k, cache.v, tables, meta.kernel_seq_of_token, positions,
            meta.kernel_window, head_dim ** -0.5 if scale is None else scale, *((cache.k_scale, cache.v_scale) if cache.quantized else ())))
        selected = None
    for bucket in meta.decode_buckets:
        if selected is not None and bucket.start >= sparse.end:
            parts.append(_sparse_decode(q, cache, sparse, selected, scale, softcap))
            selected = None
        k_ctx, v_ctx = cache.gather(bucket.block_tables)
        if bucket.q_len == 1:
            out = decode_attention(q[bucket.start:bucket.end], k_ctx, v_ctx, bucket.mask, scale, softcap)
            parts.append(out.reshape(bucket.end - bucket.start, num_heads * head_dim))
        else:
            parts.append(short_query_attention(q[bucket.start:bucket.end], k_ctx, v_ctx, bucket, scale, softcap))
    if selected is not None:
        parts.append(_sparse_decode(q, cache, sparse, selected, scale, softcap))
    if num_tokens > nd:
        q_pre = q[nd:]
        if meta.prefill_fresh_causal:
            out = attend(q_pre.transpose(0, 1).unsqueeze(0), k[nd:].transpose(0, 1).unsqueeze(0),
                         v[nd:].transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
                         softcap=softcap)  # [1, H, Tp, D]
            parts.append(out[0].transpose(0, 1).reshape(-1, num_heads * head_dim))
        else:
            batch = meta.prefill_block_tables.shape[0]
            padded = q_pre.new_zeros(batch * meta.prefill_max_q, num_heads, head_dim)
            padded[meta.prefill_pad_index] = q_pre
            padded = padded.view(batch, meta.prefill_max_q, num_heads, head_dim).transpose(1, 2)
            k_ctx, v_ctx = cache.gather(meta.prefill_block_tables)
            out = attend(padded, k_ctx, v_ctx, meta.prefill_mask, scale=scale,
                         softcap=softcap)  # [Bp, H, max_q, D]
            out = out.transpose(1, 2).reshape(batch * meta.prefill_max_q, num_heads * head_dim)
            parts.append(out[meta.prefill_pad_index])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _sparse_decode(q: torch.Tensor, cache: LayerKVCache, sparse: SparseDecode,
                   selected: tuple[torch.Tensor, torch.Tensor], scale: float | None,
                   softcap: float | None) -> torch.Tensor:
    """The sparse decodes through PyTorch: gather only the chosen blocks. Returns [m, H * D]."""
    tables, lens = selected
    k_ctx, v_ctx = cache.gather(tables)
    mask = decode_mask(lens, tables.shape[1] * cache.k.shape[1], None)
    out = decode_attention(q[sparse.start:sparse.end], k_ctx, v_ctx, mask, scale, softcap)
    return out.reshape(sparse.end - sparse.start, -1)
