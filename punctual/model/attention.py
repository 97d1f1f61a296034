"""Paged attention (torch reference): K and V are read through each sequence's block table.

The batch is split in two groups, each handled by vectorised calls, never a loop over
sequences: single-token queries (decodes) and multi-token chunks (prefills). Decodes are sorted
by context length and cut into a few buckets (at most MAX_DECODE_BUCKETS), each padded only to
its own longest context: with long-tailed lengths, one padded batch would gather several times
the KV that exists. Tokens are laid out decodes first, so the outputs concatenate in token order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


MAX_DECODE_BUCKETS = 4


@dataclass
class DecodeBucket:
    """Decodes of similar context length, padded to the longest of them (not of the whole batch)."""

    start: int  # first token of the bucket in the step's token order
    end: int
    block_tables: torch.Tensor  # [n, max_blocks] long
    mask: torch.Tensor  # [n, 1, 1, ctx] bool: True where a key is visible


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    num_decode_tokens: int  # the first tokens are one-token queries, one per sequence
    decode_buckets: list[DecodeBucket]
    prefill_block_tables: torch.Tensor | None  # [Bp, max_blocks] long
    prefill_mask: torch.Tensor | None  # [Bp, 1, max_q, ctx] bool
    prefill_pad_index: torch.Tensor | None  # [Tp] long: row of each prefill token in the [Bp*max_q] padding
    prefill_max_q: int
    # One prompt from position 0: attend to the chunk's own K/V with a causal mask, no gather.
    prefill_fresh_causal: bool


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values. cache: [num_blocks, block_size, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim]."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, kvh, d] via [B, nb] -> [B, kvh, nb*bs, d]"""
    batch, num_blocks = block_tables.shape
    gathered = cache[block_tables]  # [B, nb, bs, kvh, d]
    return gathered.view(batch, num_blocks * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (already written to the cache). Returns [T, H*D]."""
    num_tokens, num_heads, head_dim = q.shape
    parts = []
    nd = meta.num_decode_tokens
    for bucket in meta.decode_buckets:
        q_dec = q[bucket.start:bucket.end].unsqueeze(2)  # [n, H, 1, D]
        k_ctx = _gather(k_cache, bucket.block_tables)
        v_ctx = _gather(v_cache, bucket.block_tables)
        out = F.scaled_dot_product_attention(q_dec, k_ctx, v_ctx, attn_mask=bucket.mask, enable_gqa=True)
        parts.append(out.reshape(bucket.end - bucket.start, num_heads * head_dim))
    if num_tokens > nd:
        q_pre = q[nd:]
        if meta.prefill_fresh_causal:
            out = F.scaled_dot_product_attention(
                q_pre.transpose(0, 1).unsqueeze(0), k[nd:].transpose(0, 1).unsqueeze(0),
                v[nd:].transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True)  # [1, H, Tp, D]
            parts.append(out[0].transpose(0, 1).reshape(-1, num_heads * head_dim))
        else:
            batch = meta.prefill_block_tables.shape[0]
            padded = q_pre.new_zeros(batch * meta.prefill_max_q, num_heads, head_dim)
            padded[meta.prefill_pad_index] = q_pre
            padded = padded.view(batch, meta.prefill_max_q, num_heads, head_dim).transpose(1, 2)
            k_ctx = _gather(k_cache, meta.prefill_block_tables)
            v_ctx = _gather(v_cache, meta.prefill_block_tables)
            out = F.scaled_dot_product_attention(padded, k_ctx, v_ctx, attn_mask=meta.prefill_mask,
                                                 enable_gqa=True)  # [Bp, H, max_q, D]
            out = out.transpose(1, 2).reshape(batch * meta.prefill_max_q, num_heads * head_dim)
            parts.append(out[meta.prefill_pad_index])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
