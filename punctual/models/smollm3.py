"""SmolLM3: Llama with some layers that have no rotary (NoPE), listed in no_rope_layers (1: rotary)."""
from __future__ import annotations

from punctual.models.config import ModelArchConfig
from punctual.models.llama import windows_if_enabled
from punctual.models.spec import Architecture


def _smollm3(arch: ModelArchConfig, cfg: dict) -> None:
    windows_if_enabled(arch, cfg)
    flags = cfg.get("no_rope_layers")
    if flags is not None:
        arch.rope_layers = [bool(flag) for flag in flags]


SMOLLM3 = Architecture("SmolLM3ForCausalLM", _smollm3)
