"""Granite (3.x): Llama with four scalars: embedding, attention, residual and logits multipliers."""
from __future__ import annotations

from punctual.models.config import ModelArchConfig
from punctual.models.spec import Architecture


def _granite(arch: ModelArchConfig, cfg: dict) -> None:
    arch.embed_scale = cfg.get("embedding_multiplier", 1.0)
    arch.attn_scale = cfg.get("attention_multiplier", 1.0)
    arch.residual_multiplier = cfg.get("residual_multiplier", 1.0)
    arch.logits_divisor = cfg.get("logits_scaling", 1.0)


GRANITE = Architecture("GraniteForCausalLM", _granite)
