"""Phi-3 and Phi-4 (mini): fused qkv and gate/up projections, LongRoPE, partial rotary."""
from __future__ import annotations

from punctual.models.config import ModelArchConfig
from punctual.models.spec import Architecture, WeightNames


def _phi3(arch: ModelArchConfig, cfg: dict) -> None:
    if arch.rope_scaling is not None and "original_max_position_embeddings" not in arch.rope_scaling:
        original = cfg.get("original_max_position_embeddings")
        if original:
            arch.rope_scaling = {**arch.rope_scaling, "original_max_position_embeddings": original}


PHI3 = Architecture("Phi3ForCausalLM", _phi3, WeightNames(qkv="qkv_proj", gate_up="gate_up_proj"))
