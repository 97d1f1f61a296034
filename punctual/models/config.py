"""What a decoder-only checkpoint's architecture is, as the shared decoder stack reads it.

`ModelArchConfig` holds the shape every architecture has and, with Llama's values as defaults,
each way an architecture departs from Llama (norm style, activation, q/k norms, scalings,
soft-caps, per-layer attention windows and rotary, experts). An architecture file in this
package states only its departures (models/registry.py); nothing downstream branches on names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from punctual.models.rope import NEEDS_ORIGINAL_LENGTH, RopeSpec, max_positions, rope_type

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclass
class MoEConfig:
    """A sparse MLP: a router picks `top_k` of `num_experts` experts per token."""

    num_experts: int
    top_k: int
    intermediate_size: int  # one expert's
    norm_topk_prob: bool  # renormalise the top-k router probabilities to sum to one (Mixtral always)
    shared_intermediate_size: int = 0  # Qwen2-MoE's always-on shared expert, behind a sigmoid gate (0: none)


@dataclass
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # the window of the layers whose type is sliding_attention
    checkpoint_dtype: str | None
    eos_token_ids: list[int] = field(default_factory=list)
    # ---- how the architecture departs from Llama (the defaults are Llama's) ----
    hidden_act: str = "silu"  # or gelu_pytorch_tanh (Gemma)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), in float32
    sandwich_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too, four a layer
    qk_norm: str = "none"  # "head": RMSNorm per head before rotary (Qwen3, Gemma 3); "full": over all heads (OLMoE)
    embed_scale: float | None = None  # embeddings times this (Gemma: sqrt(hidden); Granite: embedding_multiplier)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    residual_multiplier: float = 1.0  # Granite: each sublayer's output times this before the residual add
    logits_divisor: float = 1.0  # Granite: logits / logits_scaling
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to +-clip
    layer_types: list[str] = field(default_factory=list)  # per layer: full_attention | sliding_attention
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' own rotary base
    rope_layers: list[bool] | None = None  # SmolLM3: False for layers without rotary
    partial_rotary_factor: float = 1.0  # the share of each head's dims that rotate (Phi-4-mini)
    moe: MoEConfig | None = None
    moe_layers: list[bool] = field(default_factory=list)  # which layers' MLP is `moe`

    def __post_init__(self):
        if not self.layer_types:
            kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
            self.layer_types = [kind] * self.num_layers
        if self.moe is not None and not self.moe_layers:
            self.moe_layers = [True] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, the model has {self.num_layers}")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window_of(self, layer: int) -> int | None:
        """The attention window of a layer: None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    @property
    def windows(self) -> set[int | None]:
        return {self.window_of(i) for i in range(self.num_layers)}

    @property
    def attention_windows(self) -> list[int | None]:
        """The layers' distinct windows, full attention (None) first: one attention metadata each."""
        return sorted(self.windows, key=lambda window: window or 0)

    def rope_of(self, layer: int) -> RopeSpec | None:
        """The rotary table a layer uses; None where it has no rotary (SmolLM3's NoPE layers)."""
        if self.rope_layers is not None and not self.rope_layers[layer]:
            return None
        local = self.layer_types[layer] == SLIDING_ATTENTION and self.local_rope_theta is not None
        # Gemma 3's local layers: plain RoPE at their own base; the global ones keep any scaling.
        return RopeSpec(self.local_rope_theta if local else self.rope_theta, self.rotary_dim,
                        self.max_position_embeddings, None if local else self.rope_scaling)

    @property
    def max_positions(self) -> int:
        """The longest sequence the model serves: max_position_embeddings, stretched where the
        rope scaling stretches a pre-scaling length (dynamic NTK, YaRN; see rope.max_positions)."""
        return max_positions(RopeSpec(self.rope_theta, self.rotary_dim, self.max_position_embeddings,
                                      self.rope_scaling))

    @property
    def in_decode_stack(self) -> bool:
        """True where the fused whole-stack decode kernel computes this model's layer: Llama's, with
        Qwen3's per-head q/k norms or without."""
        return (self.hidden_act == "silu" and not self.norm_plus_one and not self.sandwich_norms
                and self.qk_norm in ("none", "head") and self.embed_scale is None and self.residual_multiplier == 1.0
                and self.attn_softcap is None and self.clip_qkv is None and len(self.windows) == 1
                and self.local_rope_theta is None and (self.rope_layers is None or all(self.rope_layers))
                and self.partial_rotary_factor == 1.0 and self.moe is None)


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"checkpoint {path} has no config.json")
    return json.loads(config_file.read_text())


def eos_ids(path: Path, cfg: dict) -> list[int]:
    ids: list[int] = []
    sources = [cfg]
    gen_file = path / "generation_config.json"
    if gen_file.exists():
        sources.insert(0, json.loads(gen_file.read_text()))
    for source in sources:
        eos = source.get("eos_token_id")
        for token_id in eos if isinstance(eos, list) else [eos]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return ids


def rope_parameters(cfg: dict, layer_type: str | None = None) -> dict:
    """The checkpoint's rotary parameters: transformers >= 5 keeps theta and scaling together in
    `rope_parameters` (per layer type for Gemma 3); older configs use rope_theta / rope_scaling."""
    rope = cfg.get("rope_parameters") or {}
    if layer_type is not None and isinstance(rope.get(layer_type), dict):
        return rope[layer_type]
    if FULL_ATTENTION in rope and isinstance(rope[FULL_ATTENTION], dict):
        return rope[FULL_ATTENTION]
    return rope


def rope_scaling(cfg: dict, rope: dict) -> dict | None:
    """The scaling dict as transformers standardises it: `rope_scaling` (older configs) or the
    `rope_parameters` dict, with rope_type named and, for the types that need it, the
    pre-training length (max_position_embeddings where the dict has none)."""
    scaling = dict(cfg.get("rope_scaling") or rope)
    kind = rope_type(scaling)
    if kind == "default":
        return None
    scaling["rope_type"] = kind
    if kind in NEEDS_ORIGINAL_LENGTH:
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    return scaling


def base_config(architecture: str, path: Path, cfg: dict) -> ModelArchConfig:
    """The fields every architecture has, read the way Llama's config names them."""
    num_heads = cfg["num_attention_heads"]
    rope = rope_parameters(cfg)
    # transformers reads theta and the partial rotary share from the rope dict first, then the top level.
    params = cfg.get("rope_scaling") or rope
    return ModelArchConfig(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        intermediate_size=cfg.get("intermediate_size") or 0,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=params.get("rope_theta") or cfg.get("rope_theta") or 10000.0,
        rope_scaling=rope_scaling(cfg, rope),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
        sliding_window=cfg.get("sliding_window"),
        checkpoint_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        eos_token_ids=eos_ids(path, cfg),
        partial_rotary_factor=params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0,
        layer_types=list(cfg.get("layer_types") or []),
    )
