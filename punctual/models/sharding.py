"""One rank's shard of a checkpoint for tensor parallelism (Megatron-LM's split, as vLLM does it).

Attention heads and MLP intermediate columns are split across the ranks: q/k/v and gate/up keep
the rows of the rank's heads and columns (column-parallel), o_proj and down_proj the matching
input columns (row-parallel: each rank's product is a partial sum, all-reduced by the decoder).
Where the ranks outnumber the KV heads, each rank keeps the one KV head its query heads read
(replicated, as vLLM does). The head keeps a slice of the vocabulary (padded to equal slices,
so an all-gather reassembles the logits); the embedding stays whole on every rank (a lookup
needs every row, and a vocab-split lookup would cost a third collective per step).
"""
from __future__ import annotations

import dataclasses

import torch

from punctual.models.config import ModelArchConfig
from punctual.models.spec import WeightNames


def check_tensor_parallel_size(arch: ModelArchConfig, size: int) -> None:
    """ValueError naming the numbers when `size` ranks cannot split this model evenly."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if arch.num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {arch.num_heads} attention "
                         f"heads (choose a divisor of {arch.num_heads})")
    if arch.num_kv_heads % size and size % arch.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} and the model's {arch.num_kv_heads} KV heads: one must "
                         "divide the other (KV heads are split, or replicated where the ranks outnumber them)")
    if arch.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's MLP intermediate size "
                         f"{arch.intermediate_size}")
    if arch.moe is not None:
        raise ValueError(f"tensor_parallel_size {size}: mixture-of-experts models ({arch.architecture}) are not "
                         "split across ranks yet")
    if arch.qk_norm == "full":
        raise ValueError(f"tensor_parallel_size {size}: {arch.architecture} normalises q and k over all heads at "
                         "once, which a rank holding some heads cannot do")


def shard_arch(arch: ModelArchConfig, rank: int, size: int) -> ModelArchConfig:
    """The architecture as one rank sees it: its heads and MLP columns; the vocabulary stays whole
    (the runner's sampler and limits read it), the head's slice is padded (vocab_slice)."""
    return dataclasses.replace(arch, num_heads=arch.num_heads // size,
                               num_kv_heads=max(1, arch.num_kv_heads // size),
                               intermediate_size=arch.intermediate_size // size,
                               attn_scale=arch.scale, tie_word_embeddings=False)


def vocab_slice(vocab_size: int, rank: int, size: int) -> tuple[int, int, int]:
    """(start, end, padded rows) of rank's slice of the vocabulary: equal slices of ceil(V / N)
    rows, the last one short of real rows (padded with zeros)."""
    rows = -(-vocab_size // size)
    start = min(rank * rows, vocab_size)
    return start, min(start + rows, vocab_size), rows


def shard_checkpoint(arch: ModelArchConfig, weights: dict[str, torch.Tensor], names: WeightNames,
                     rank: int, size: int) -> tuple[ModelArchConfig, dict[str, torch.Tensor]]:
    """(rank's architecture, rank's tensors), from the whole checkpoint's (dense tensors; quantize
    after sharding). Tensors other than the split ones pass through (norms, embedding)."""
    check_tensor_parallel_size(arch, size)
    head_dim = arch.head_dim
    q_rows = arch.num_heads // size * head_dim
    q_part = slice(rank * q_rows, (rank + 1) * q_rows)
    if arch.num_kv_heads >= size:
        kv_rows = arch.num_kv_heads // size * head_dim
        kv_part = slice(rank * kv_rows, (rank + 1) * kv_rows)
    else:  # replicated: the KV head this rank's query heads belong to
        kv_head = rank // (size // arch.num_kv_heads)
        kv_part = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
    inter = arch.intermediate_size // size
    mlp_part = slice(rank * inter, (rank + 1) * inter)
    q_size, kv_size = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
    out = dict(weights)

    def rows(name: str, part: slice) -> None:
        if name in out:
            out[name] = out[name][part].contiguous()

    def columns(name: str, part: slice) -> None:
        if name in out:
            out[name] = out[name][:, part].contiguous()

    def stacked_rows(name: str, sizes: list[int], parts: list[slice]) -> None:
        if name in out:
            pieces = out[name].split(sizes, dim=0)
            out[name] = torch.cat([piece[part] for piece, part in zip(pieces, parts)]).contiguous()

    def first_rank_only(name: str) -> None:
        # A row-parallel linear's bias is added once: by rank 0, before the all-reduce.
        if name in out and rank != 0:
            out[name] = torch.zeros_like(out[name])

    for i in range(arch.num_layers):
        attn = names.layer.format(i=i) + names.attn
        for suffix in (".weight", ".bias"):
            rows(attn + names.q + suffix, q_part)
            rows(attn + names.k + suffix, kv_part)
            rows(attn + names.v + suffix, kv_part)
            if names.qkv is not None:
                stacked_rows(attn + names.qkv + suffix, [q_size, kv_size, kv_size], [q_part, kv_part, kv_part])
        columns(attn + names.o + ".weight", q_part)
        first_rank_only(attn + names.o + ".bias")
        for prefix in names.mlp:
            mlp = names.layer.format(i=i) + prefix
            for suffix in (".weight", ".bias"):
                rows(mlp + names.gate + suffix, mlp_part)
                rows(mlp + names.up + suffix, mlp_part)
                if names.gate_up is not None:
                    stacked_rows(mlp + names.gate_up + suffix, [arch.intermediate_size] * 2, [mlp_part] * 2)
            columns(mlp + names.down + ".weight", mlp_part)
            first_rank_only(mlp + names.down + ".bias")

    head = out.get(names.lm_head) if not arch.tie_word_embeddings else None
    head = out[names.embed] if head is None else head
    start, end, padded = vocab_slice(arch.vocab_size, rank, size)
    piece = head.new_zeros(padded, head.shape[1])
    piece[:end - start] = head[start:end]
    out[names.lm_head] = piece
    return shard_arch(arch, rank, size), out
