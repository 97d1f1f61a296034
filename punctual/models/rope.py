"""Rotary position embeddings: the cos/sin tables a decoder layer rotates q and k with.

Tables are computed once in float32 over every position, with the same arithmetic as
transformers' ROPE_INIT_FUNCTIONS (inverse frequencies from an int64 arange, positions times
frequencies, cos/sin, then the scaling type's attention factor), so float32 greedy output
matches it exactly.

Two scaling types depend on the sequence length in transformers: `longrope` picks its short or
long factors by the length of the sequence in the forward pass, and `dynamic` (NTK) recomputes
its base once the sequence outgrows max_position_embeddings. A paged KV cache cannot re-rotate
the keys it holds, so here each position has one rotation, fixed for good:

    row p of a table is what transformers rotates the LAST token of a (p + 1)-token sequence with.

So `longrope` uses the short factors below original_max_position_embeddings and the long ones
from it on; `dynamic` the plain base below max_position_embeddings and, at position p past it,
the base transformers grows for p + 1 tokens. That equals transformers for any sequence within
the original context. Past it:
  - dynamic: equal to transformers' cached generate while the prompt fits (its cache keeps the
    keys it rotated earlier, as ours does); a longer prompt is rotated there in one forward pass
    with the prompt length's base at every position, here position by position.
  - longrope: transformers' Phi-3 generate drops its cache when a sequence first passes the
    original context and recomputes it with the long factors at every position (as it rotates a
    longer prompt); here the first original_max_position_embeddings keys keep their short
    rotation. vLLM instead uses the long factors at every position whenever max_model_len exceeds
    the original context: consistent past it, but unlike transformers for every short sequence.
    vLLM's dynamic NTK uses the base of its longest length at every position, unlike transformers
    even within max_position_embeddings.
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
    max_position_embeddings: int  # the config's, before any scaling stretches it
    # The checkpoint's rope scaling dict (rope_type and its parameters); None for plain RoPE. Compared
    # (two specs that differ only in scaling are two tables) but not hashed (a dict is not hashable).
    scaling: dict | None = field(default=None, hash=False)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
# Types whose parameters include the pre-training context length (transformers fills it in).
NEEDS_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")


def rope_type(scaling: dict | None) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _param(scaling: dict, key: str, kind: str):
    if scaling.get(key) is None:
        raise ValueError(f"rope_scaling of type {kind!r} needs {key!r}")
    return scaling[key]


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** _exponents(dim))


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


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate the low frequencies by `factor`, keep the high ones,
    ramp between the dims that turn beta_fast and beta_slow times over the original context."""
    scaling, dim, base = spec.scaling, spec.rotary_dim, spec.theta
    original = _param(scaling, "original_max_position_embeddings", "yarn")
    factor = scaling.get("factor") or spec.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** _exponents(dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of each frequency left unscaled
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _longrope(spec: RopeSpec, long: bool) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3/Phi-4): per-frequency rescale factors, short within the original context,
    long beyond it; cos and sin scaled by sqrt(1 + ln(factor) / ln(original))."""
    scaling, dim = spec.scaling, spec.rotary_dim
    original = _param(scaling, "original_max_position_embeddings", "longrope")
    key = "long_factor" if long else "short_factor"
    rescale = _param(scaling, key, "longrope")
    if len(rescale) != dim // 2:
        raise ValueError(f"rope_scaling {key} has {len(rescale)} values; the rotary dim {dim} needs {dim // 2}")
    factor = scaling.get("factor") or spec.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    inv_freq = 1.0 / (torch.tensor(rescale, dtype=torch.float32) * spec.theta ** _exponents(dim))
    return inv_freq, attention_factor


def _dynamic_ntk(spec: RopeSpec, seq_len: int | None) -> torch.Tensor:
    """Dynamic NTK: the base grows with the sequence once it passes max_position_embeddings."""
    dim, factor = spec.rotary_dim, _param(spec.scaling, "factor", "dynamic")
    max_len = spec.max_position_embeddings
    if seq_len is None or seq_len <= max_len:
        base = spec.theta * ((factor * max_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** _exponents(dim))
    return _dynamic_ntk_grown(spec, torch.tensor([seq_len]))[0]


def _dynamic_ntk_grown(spec: RopeSpec, seq_lens: torch.Tensor) -> torch.Tensor:
    """[len(seq_lens), rotary_dim / 2]: the grown inverse frequencies for each length (int64, each
    past max_position_embeddings), bit for bit what transformers computes one length at a time
    from a 0-dim tensor. Its two pows there take PyTorch's scalar loop (one element) and one
    row's split of vector and tail lanes; vectorised naively they round differently (1 ulp), so
    the first pow runs over a strided view (the scalar loop per element) and the second in
    blocks under the intra-op grain size (no thread splits a row)."""
    dim, factor, max_len = spec.rotary_dim, spec.scaling["factor"], spec.max_position_embeddings
    grown = (factor * seq_lens / max_len) - (factor - 1)
    strided = torch.stack((grown, grown), dim=1)[:, 0]
    base = spec.theta * strided ** (dim / (dim - 2))
    rows = max(1, 16384 // max(1, dim // 2))
    exponents = _exponents(dim)
    return torch.cat([1.0 / (base[start:start + rows, None] ** exponents) for start in range(0, len(base), rows)])


def inv_freq_for(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [rotary_dim / 2] and the factor cos and sin are multiplied by, for a
    sequence of `seq_len` tokens (None: at load; only longrope and dynamic depend on it)."""
    kind = rope_type(spec.scaling)
    if kind == "default":
        return _default_inv_freq(spec.theta, spec.rotary_dim), 1.0
    if kind == "linear":
        return _default_inv_freq(spec.theta, spec.rotary_dim) / _param(spec.scaling, "factor", kind), 1.0
    if kind == "llama3":
        return _llama3(_default_inv_freq(spec.theta, spec.rotary_dim), spec.scaling), 1.0
    if kind == "yarn":
        return _yarn(spec)
    if kind == "longrope":
        original = _param(spec.scaling, "original_max_position_embeddings", kind)
        return _longrope(spec, long=seq_len is not None and seq_len > original)
    if kind == "dynamic":
        return _dynamic_ntk(spec, seq_len), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def max_positions(spec: RopeSpec) -> int:
    """The longest sequence the table serves. Types that stretch a pre-scaling length stretch it
    by their factor, as vLLM derives max_model_len: dynamic NTK's max_position_embeddings is
    that length, YaRN's is original_max_position_embeddings (Qwen's long-context recipe adds
    yarn to a config and keeps max_position_embeddings)."""
    kind, scaling = rope_type(spec.scaling), spec.scaling
    if kind == "dynamic":
        return int(spec.max_position_embeddings * _param(scaling, "factor", kind))
    if kind == "yarn" and scaling.get("factor"):
        original = _param(scaling, "original_max_position_embeddings", kind)
        return max(spec.max_position_embeddings, math.ceil(original * scaling["factor"]))
    return spec.max_position_embeddings


def rope_tables(spec: RopeSpec, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: float32 [num_positions, rotary_dim], the halves repeated as rotate_half expects.
    Row p rotates position p as transformers rotates the last token of a (p + 1)-token sequence."""
    inv_freq, attention_factor = inv_freq_for(spec)
    inv_freq = inv_freq.expand(num_positions, -1).clone()  # [P, rotary_dim / 2]: one row per position
    kind = rope_type(spec.scaling)
    if kind == "longrope":  # positions past the original context: the long factors
        original = spec.scaling["original_max_position_embeddings"]
        if num_positions > original:
            inv_freq[original:] = inv_freq_for(spec, original + 1)[0]
    elif kind == "dynamic":  # each position past max_position_embeddings: its own grown base
        if num_positions > spec.max_position_embeddings:
            lengths = torch.arange(spec.max_position_embeddings + 1, num_positions + 1, dtype=torch.int64)
            inv_freq[spec.max_position_embeddings:] = _dynamic_ntk_grown(spec, lengths)
    positions = torch.arange(num_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor
