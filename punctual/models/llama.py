"""Llama 2/3 (and SmolLM, SmolLM2), Mistral and Qwen2: the decoder stack with Llama's defaults."""
from __future__ import annotations

from punctual.models.config import FULL_ATTENTION, ModelArchConfig
from punctual.models.spec import Architecture


def windows_if_enabled(arch: ModelArchConfig, cfg: dict) -> None:
    """Qwen configs carry a sliding_window that applies only with use_sliding_window."""
    if not cfg.get("use_sliding_window", False):
        arch.sliding_window = None
        arch.layer_types = [FULL_ATTENTION] * arch.num_layers


LLAMA = Architecture("LlamaForCausalLM")
MISTRAL = Architecture("MistralForCausalLM")
QWEN2 = Architecture("Qwen2ForCausalLM", windows_if_enabled)
