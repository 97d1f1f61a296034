"""Phi-3 and Phi-4 (mini): fused qkv and gate/up projections, LongRoPE, partial rotary."""
from __future__ import annotations

from punctual.models.config import ModelArchConfig
from punctual.models.spec import Architecture, WeightNames


def _phi3(arch: ModelArchConfig, cfg: dict) -> None:
    if arch.rope_scaling is None:
        return
    scaling = dict(arch.rope_scaling)
    # Early Phi-3 configs name LongRoPE "su" (or "yarn"); transformers' Phi3Config reads both as longrope.
    if scaling["rope_type"] in ("su", "yarn"):
        scaling["rope_type"] = "longrope"
    if scaling["rope_type"] == "longrope":
        # Phi3Config keeps original_max_position_embeddings at the top level (default 4096) and it
        # wins over the scaling dict's, as transformers' standardisation gives it priority.
        scaling["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings") or 4096
    arch.rope_scaling = scaling


PHI3 = Architecture("Phi3ForCausalLM", _phi3, WeightNames(qkv="qkv_proj", gate_up="gate_up_proj"))
