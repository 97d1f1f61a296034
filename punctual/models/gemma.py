"""Gemma, Gemma 2 and Gemma 3 (text).

All three: RMSNorm as x * (1 + w) in float32, gelu (tanh) MLP, embeddings times sqrt(hidden),
softmax scale query_pre_attn_scalar ** -0.5, tied embeddings. Gemma 2 and 3 add norms on the
attention and MLP outputs and alternate sliding-window and global layers; Gemma 2 soft-caps
attention scores and final logits; Gemma 3 normalises q and k per head and gives its local
layers their own rotary base.
"""
from __future__ import annotations

from punctual.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelArchConfig, rope_parameters
from punctual.models.spec import Architecture, WeightNames


def _gemma(arch: ModelArchConfig, cfg: dict) -> None:
    arch.hidden_act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    arch.norm_plus_one = True
    arch.embed_scale = arch.hidden_size ** 0.5
    arch.attn_scale = cfg.get("query_pre_attn_scalar", arch.head_dim) ** -0.5
    arch.tie_word_embeddings = cfg.get("tie_word_embeddings", True)


def _alternating(arch: ModelArchConfig, cfg: dict, pattern: int) -> None:
    """Every `pattern`-th layer global, the others sliding, unless the config lists layer_types."""
    if not cfg.get("layer_types"):
        arch.layer_types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
                            for i in range(arch.num_layers)]
    if not arch.sliding_window:
        arch.layer_types = [FULL_ATTENTION] * arch.num_layers


def _gemma2(arch: ModelArchConfig, cfg: dict) -> None:
    _gemma(arch, cfg)
    arch.sandwich_norms = True
    arch.attn_softcap = cfg.get("attn_logit_softcapping")
    arch.final_softcap = cfg.get("final_logit_softcapping")
    _alternating(arch, cfg, 2)


def _gemma3(arch: ModelArchConfig, cfg: dict) -> None:
    _gemma(arch, cfg)
    arch.sandwich_norms = True
    arch.qk_norm = "head"
    arch.attn_softcap = cfg.get("attn_logit_softcapping")
    arch.final_softcap = cfg.get("final_logit_softcapping")
    _alternating(arch, cfg, cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    local = rope_parameters(cfg, SLIDING_ATTENTION)
    arch.local_rope_theta = cfg.get("rope_local_base_freq") or local.get("rope_theta") or 10000.0


_SANDWICH = WeightNames(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                        mlp_out_norm="post_feedforward_layernorm")

GEMMA = Architecture("GemmaForCausalLM", _gemma)
GEMMA2 = Architecture("Gemma2ForCausalLM", _gemma2, _SANDWICH)
GEMMA3 = Architecture("Gemma3ForCausalLM", _gemma3, _SANDWICH)
