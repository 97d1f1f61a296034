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
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TensorShard:
    """The part of one checkpoint tensor a rank keeps: the row ranges `rows` (stacked in order) of
    the columns `columns`, then `pad_rows` rows of zeros; `zeros`: nothing of it, zeros of its
    whole shape (a row-parallel bias on ranks past 0)."""

    rows: tuple[slice, ...] = (slice(None),)
    columns: slice | None = None
    pad_rows: int = 0
    zeros: bool = False

    def take(self, view, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The shard as a tensor of its own in `dtype`, read through `view`: the whole tensor, or
        a lazy handle on it (safetensors' get_slice) that reads only the indexed part."""
        if self.zeros:
            return torch.zeros(tuple(shape), dtype=dtype)
        pieces = [view[part] if self.columns is None else view[part, self.columns] for part in self.rows]
        num_rows = sum(piece.shape[0] for piece in pieces)
        # One copy per piece (converting the dtype as it goes): the result owns its memory, so
        # nothing keeps the whole tensor (or its memory-mapped pages) alive.
        out = torch.empty((num_rows + self.pad_rows, *pieces[0].shape[1:]), dtype=dtype)
        at = 0
        for piece in pieces:
            out[at:at + piece.shape[0]].copy_(piece)
            at += piece.shape[0]
        out[at:].zero_()
        return out


def shard_plan(arch: ModelArchConfig, names: WeightNames, rank: int, size: int) -> dict[str, TensorShard]:
    """Checkpoint name -> what rank keeps of it, for every tensor that is split (the others, norms
    and the embedding, are kept whole). A tied head is not in it: finish_shard slices the embedding."""
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
    plan: dict[str, TensorShard] = {}

    def stacked(sizes: list[int], parts: list[slice]) -> TensorShard:
        """Rows of a fused projection: each part taken from its own block of rows."""
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return TensorShard(rows=tuple(slice(o + p.start, o + p.stop) for o, p in zip(offsets, parts)))

    for i in range(arch.num_layers):
        attn = names.layer.format(i=i) + names.attn
        for suffix in (".weight", ".bias"):
            plan[attn + names.q + suffix] = TensorShard(rows=(q_part,))
            plan[attn + names.k + suffix] = TensorShard(rows=(kv_part,))
            plan[attn + names.v + suffix] = TensorShard(rows=(kv_part,))
            if names.qkv is not None:
                plan[attn + names.qkv + suffix] = stacked([q_size, kv_size, kv_size], [q_part, kv_part, kv_part])
        plan[attn + names.o + ".weight"] = TensorShard(columns=q_part)
        if rank != 0:  # a row-parallel linear's bias is added once: by rank 0, before the all-reduce
            plan[attn + names.o + ".bias"] = TensorShard(zeros=True)
        for prefix in names.mlp:
            mlp = names.layer.format(i=i) + prefix
            for suffix in (".weight", ".bias"):
                plan[mlp + names.gate + suffix] = TensorShard(rows=(mlp_part,))
                plan[mlp + names.up + suffix] = TensorShard(rows=(mlp_part,))
                if names.gate_up is not None:
                    plan[mlp + names.gate_up + suffix] = stacked([arch.intermediate_size] * 2, [mlp_part] * 2)
            plan[mlp + names.down + ".weight"] = TensorShard(columns=mlp_part)
            if rank != 0:
                plan[mlp + names.down + ".bias"] = TensorShard(zeros=True)
    if not arch.tie_word_embeddings:
        plan[names.lm_head] = _head_shard(arch.vocab_size, rank, size)
    return plan


def _head_shard(vocab_size: int, rank: int, size: int) -> TensorShard:
    start, end, padded = vocab_slice(vocab_size, rank, size)
    return TensorShard(rows=(slice(start, end),), pad_rows=padded - (end - start))


def finish_shard(arch: ModelArchConfig, weights: dict[str, torch.Tensor], names: WeightNames, rank: int,
                 size: int) -> tuple[ModelArchConfig, dict[str, torch.Tensor]]:
    """(rank's architecture, rank's tensors) from the tensors shard_plan's rows and columns were
    read into: the head's vocabulary slice comes from the embedding where the model ties them (or
    its checkpoint has no head)."""
    if arch.tie_word_embeddings or names.lm_head not in weights:
        embed = weights[names.embed]
        weights[names.lm_head] = _head_shard(arch.vocab_size, rank, size).take(embed, embed.shape, embed.dtype)
    return shard_arch(arch, rank, size), weights


def shard_checkpoint(arch: ModelArchConfig, weights: dict[str, torch.Tensor], names: WeightNames,
                     rank: int, size: int) -> tuple[ModelArchConfig, dict[str, torch.Tensor]]:
    """(rank's architecture, rank's tensors), from the whole checkpoint's in memory (dense tensors;
    quantize after sharding). checkpoints/loader.load_shard reads the same shard from the files."""
    plan = shard_plan(arch, names, rank, size)
    out = {name: plan[name].take(tensor, tensor.shape, tensor.dtype) if name in plan else tensor
           for name, tensor in weights.items()}
    return finish_shard(arch, out, names, rank, size)
