"""Moving cached keys to earlier positions (attention sinks): re-rotating K in place.

Keys are cached rotated at their position p. StreamingLLM evicts tokens from the middle of the
cache and gives the tokens after them positions within the cache, so a key cached at p must
become the key at p - shift. Rotations compose: with the tables' cos/sin at p (c_p = m cos
phi_p, s_p = m sin phi_p, m the scaling type's attention factor),
    cos(phi_new - phi_old) = (c_new c_old + s_new s_old) / m^2
    sin(phi_new - phi_old) = (s_new c_old - c_new s_old) / m^2,
so one rotation by that difference turns the cached key into the one a fresh forward pass
writes at p - shift, whatever the frequencies (any scaling type, one table per layer type).
Computed in float32 from float32 tables; the cache keeps its own dtype (int8: re-quantized).
"""
from __future__ import annotations

import torch

from punctual.models.attention import LayerKVCache, quantize_int8
from punctual.models.config import ModelArchConfig
from punctual.models.decoder import rotate_half
from punctual.models.rope import rope_tables


class KeyShifter:
    """Re-rotates the cached keys of whole blocks to positions `shift` earlier, every layer."""

    def __init__(self, arch: ModelArchConfig, num_positions: int, device: torch.device):
        self.device = device
        specs, self.layer_table = [], []  # layer -> index into self.tables, None: no rotary (NoPE)
        for i in range(arch.num_layers):
            spec = arch.rope_of(i)
            if spec is not None and spec not in specs:
                specs.append(spec)
            self.layer_table.append(None if spec is None else specs.index(spec))
        self.tables = [tuple(t.to(device) for t in rope_tables(spec, num_positions)) for spec in specs]

    def _rotation(self, table: int, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [P, rotary_dim] of the rotation from positions `old` to `new`."""
        cos, sin = self.tables[table]
        scale = cos[0, 0] * cos[0, 0]  # m^2: position 0 has angle 0
        c_old, s_old, c_new, s_new = cos[old], sin[old], cos[new], sin[new]
        return (c_new * c_old + s_new * s_old) / scale, (s_new * c_old - c_new * s_old) / scale

    @torch.inference_mode()
    def shift(self, kv_caches: list[LayerKVCache], block_ids: list[int] | tuple[int, ...], first_position: int,
              shift: int) -> None:
        """The keys of `block_ids`, holding positions first_position.. in order, move to
        first_position - shift..; values do not depend on position and stay as they are."""
        if not block_ids or shift == 0:
            return
        blocks = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        block_size = kv_caches[0].k.shape[1]
        old = torch.arange(first_position, first_position + len(block_ids) * block_size, device=self.device)
        rotations = [self._rotation(t, old, old - shift) for t in range(len(self.tables))]
        for cache, table in zip(kv_caches, self.layer_table):
            if table is None:
                continue
            cos, sin = (r.view(len(block_ids), block_size, 1, -1) for r in rotations[table])  # [nb, bs, 1, rd]
            keys = cache.k[blocks]  # [nb, bs, kv_heads, head_dim]
            if cache.quantized:
                keys = keys.float() * cache.k_scale[blocks].unsqueeze(-1)
            keys = keys.float()
            rotary_dim = cos.shape[-1]
            part = keys[..., :rotary_dim]
            keys[..., :rotary_dim] = part * cos + rotate_half(part) * sin
            if cache.quantized:
                q, scale = quantize_int8(keys.view(-1, *keys.shape[2:]))
                cache.k[blocks] = q.view(keys.shape)
                cache.k_scale[blocks] = scale.view(keys.shape[:3])
            else:
                cache.k[blocks] = keys.to(cache.k.dtype)
