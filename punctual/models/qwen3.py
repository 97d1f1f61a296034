"""Qwen3: Qwen2 without q/k/v biases, with an RMSNorm on each query and key head before rotary."""
from __future__ import annotations

from punctual.models.config import ModelArchConfig
from punctual.models.llama import windows_if_enabled
from punctual.models.spec import Architecture


def _qwen3(arch: ModelArchConfig, cfg: dict) -> None:
    windows_if_enabled(arch, cfg)
    arch.qk_norm = "head"


QWEN3 = Architecture("Qwen3ForCausalLM", _qwen3)
