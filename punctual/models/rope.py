"""Rotary position embeddings: the cos/sin tables a decoder layer rotates q and k with.

Tables are computed once in float32 over every position, with the same arithmetic as
transformers (inverse frequencies from an int64 arange, positions times frequencies, cos/sin,
then the scaling type's attention factor), so float32 greedy output matches it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RopeSpec:
    """One rotary table: a layer type's base, how many of the head's dims rotate, its scaling."""

    theta: float
    rotary_dim: int  # head_dim, or fewer with partial rotary (Phi-4-mini, StableLM)
    max_position_embeddings: int
    # The checkpoint's rope scaling dict (rope_type and its parameters); None for plain RoPE.
    scaling: dict | None = field(default=None, hash=False, compare=False)


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_type(scaling: dict | None) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq_for(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [rotary_dim / 2] and the factor cos and sin are multiplied by."""
    inv_freq = _default_inv_freq(spec.theta, spec.rotary_dim)
    kind = rope_type(spec.scaling)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / spec.scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, spec.scaling), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def rope_tables(spec: RopeSpec, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: float32 [num_positions, rotary_dim], the halves repeated as rotate_half expects."""
    inv_freq, attention_factor = inv_freq_for(spec)
    positions = torch.arange(num_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor
