"""Tensors of the second KV tier and the copies between it and the KV pool.

On CUDA the tier is host memory (pinned, the cache's own format): GPU memory is the scarce
thing and a block comes back over PCIe far faster than it is recomputed. On CPU the pool is
already host memory, so a second tier only pays if it holds more: it stores K and V as int8
with a float32 scale per token and head (about half of bf16, a quarter of fp32; the same
quantizer as `--kv-cache-dtype int8`). A pool that is itself int8 is copied verbatim.
"""
from __future__ import annotations

import time

import torch

from punctual.models.attention import LayerKVCache, quantize_int8


class TierStore:
    def __init__(self, caches: list[LayerKVCache], num_slots: int, compressed: bool):
        first = caches[0]
        _, self.block_size, self.kv_heads, self.head_dim = first.k.shape
        self.num_slots = num_slots
        self.int8 = compressed or first.quantized
        on_cuda = first.k.device.type == "cuda"
        shape = (num_slots, self.block_size, self.kv_heads, self.head_dim)
        store = torch.int8 if self.int8 else first.k.dtype

        def host(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=on_cuda)

        self.k = [host(shape, store) for _ in caches]
        self.v = [host(shape, store) for _ in caches]
        if self.int8:
            self.k_scale = [host(shape[:3], torch.float32) for _ in caches]
            self.v_scale = [host(shape[:3], torch.float32) for _ in caches]
        self.restore_s_per_block = 0.0  # measured (exponential average); 0 until the first restore

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype, int8: bool) -> int:
        return num_layers * block_size * LayerKVCache.bytes_per_token(kv_heads, head_dim, dtype, int8)

    @torch.inference_mode()
    def copy_out(self, caches: list[LayerKVCache], block_ids: list[int], slots: list[int]) -> None:
        blocks = torch.tensor(block_ids, dtype=torch.long, device=caches[0].k.device)
        slot_index = torch.tensor(slots, dtype=torch.long)
        for layer, cache in enumerate(caches):
            for name in ("k", "v"):
                values = getattr(cache, name).index_select(0, blocks)
                if self.int8 and cache.quantized:
                    scales = getattr(cache, f"{name}_scale").index_select(0, blocks)
                elif self.int8:
                    q, scales = quantize_int8(values.view(-1, self.kv_heads, self.head_dim))
                    values, scales = q.view(values.shape), scales.view(values.shape[:3])
                getattr(self, name)[layer].index_copy_(0, slot_index, values.cpu())
                if self.int8:
                    getattr(self, f"{name}_scale")[layer].index_copy_(0, slot_index, scales.cpu())

    @torch.inference_mode()
    def copy_in(self, caches: list[LayerKVCache], slots: list[int], block_ids: list[int]) -> None:
        started = time.perf_counter()
        device = caches[0].k.device
        blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
        slot_index = torch.tensor(slots, dtype=torch.long)
        for layer, cache in enumerate(caches):
            for name in ("k", "v"):
                values = getattr(self, name)[layer].index_select(0, slot_index)
                if self.int8:
                    scales = getattr(self, f"{name}_scale")[layer].index_select(0, slot_index)
                    if cache.quantized:
                        getattr(cache, f"{name}_scale").index_copy_(0, blocks, scales.to(device, non_blocking=True))
                    else:
                        values = (values.float() * scales.unsqueeze(-1)).to(cache.dtype)
                getattr(cache, name).index_copy_(0, blocks, values.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_block = (time.perf_counter() - started) / len(block_ids)
        self.restore_s_per_block = per_block if self.restore_s_per_block == 0 else \
            0.8 * self.restore_s_per_block + 0.2 * per_block
