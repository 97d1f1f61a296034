"""KV blocks as they travel between engines: every layer's K and V for a run of a request's blocks.

Read between steps from the source's pool and written into blocks the target allocated in
advance, through a KV copy order of the target's next step plan, so a transfer never races a
model step. On the wire the blocks are in the cache's own dtype, or int8 with a float32 scale
per token and head (CacheGen's point: fewer bytes in flight; the quantizer of
`--kv-cache-dtype int8`, so a pool that is already int8 travels verbatim).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from punctual.model.attention import LayerKVCache, quantize_int8


@dataclass
class KVPayload:
    num_blocks: int
    int8: bool
    k: list[torch.Tensor]  # per layer [num_blocks, block_size, kv_heads, head_dim], on the CPU
    v: list[torch.Tensor]
    k_scale: list[torch.Tensor] | None = None  # per layer [num_blocks, block_size, kv_heads] (int8 only)
    v_scale: list[torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        tensors = self.k + self.v + (self.k_scale or []) + (self.v_scale or [])
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def read_blocks(caches: list[LayerKVCache], block_ids: list[int], int8: bool) -> KVPayload:
    device = caches[0].k.device
    blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
    int8 = int8 or caches[0].quantized
    payload = KVPayload(len(block_ids), int8, [], [], [] if int8 else None, [] if int8 else None)
    for cache in caches:
        for name in ("k", "v"):
            values = getattr(cache, name).index_select(0, blocks)
            if int8:
                if cache.quantized:
                    scales = getattr(cache, f"{name}_scale").index_select(0, blocks)
                else:
                    shape = values.shape
                    q, scales = quantize_int8(values.view(-1, shape[2], shape[3]))
                    values, scales = q.view(shape), scales.view(shape[:3])
                getattr(payload, f"{name}_scale").append(scales.cpu())
            getattr(payload, name).append(values.cpu())
    return payload


@torch.inference_mode()
def write_blocks(caches: list[LayerKVCache], block_ids: list[int], payload: KVPayload) -> None:
    if len(block_ids) != payload.num_blocks:
        raise ValueError(f"a payload of {payload.num_blocks} KV blocks cannot fill {len(block_ids)}")
    if len(payload.k) != len(caches):
        raise ValueError(f"a payload of {len(payload.k)} layers cannot fill a model of {len(caches)}")
    device = caches[0].k.device
    blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
    for layer, cache in enumerate(caches):
        for name in ("k", "v"):
            values = getattr(payload, name)[layer]
            if payload.int8:
                scales = getattr(payload, f"{name}_scale")[layer]
                if cache.quantized:
                    getattr(cache, f"{name}_scale").index_copy_(0, blocks, scales.to(device))
                else:
                    values = (values.float() * scales.unsqueeze(-1)).to(cache.dtype)
            elif cache.quantized:
                shape = values.shape
                q, scales = quantize_int8(values.view(-1, shape[2], shape[3]))
                getattr(cache, f"{name}_scale").index_copy_(0, blocks, scales.view(shape[:3]).to(device))
                values = q.view(shape)
            getattr(cache, name).index_copy_(0, blocks, values.to(device=device, dtype=getattr(cache, name).dtype))
