"""Hugging Face checkpoint directory -> architecture config and weight tensors."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from punctual.model.builtin import builtin_path, is_builtin
from punctual.model.gguf import Q4_FILE, SMOLLM2, gguf_checkpoint, is_gguf_file, smollm2_file
from punctual.model.quant import QuantizedWeight, int4_weight

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


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
    sliding_window: int | None
    checkpoint_dtype: str | None
    eos_token_ids: list[int] = field(default_factory=list)


def resolve_model_path(model: str) -> Path:
    """The checkpoint directory of a model name: a built-in, smollm2, a .gguf file (converted once
    into the cache) or a Hugging Face checkpoint directory."""
    if is_builtin(model):
        return builtin_path(model)
    if model == SMOLLM2:
        return gguf_checkpoint(smollm2_file())
    path = Path(model).expanduser()
    if is_gguf_file(model):
        return gguf_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is neither a built-in model (builtin, builtin-tiny, smollm2), a .gguf file nor a "
            "local checkpoint directory (hub downloads are not supported: pass a directory with config.json "
            "and *.safetensors)")
    return path


def load_arch_config(path: Path) -> ModelArchConfig:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"checkpoint {path} has no config.json")
    cfg = json.loads(config_file.read_text())
    architectures = cfg.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"unsupported architecture {architectures or cfg.get('model_type')!r} in {config_file}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    num_heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling together
    rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    sliding_window = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        sliding_window = None
    return ModelArchConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        intermediate_size=cfg["intermediate_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
        mlp_bias=cfg.get("mlp_bias", False),
        sliding_window=sliding_window,
        checkpoint_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        eos_token_ids=_eos_ids(path, cfg),
    )


def _eos_ids(path: Path, cfg: dict) -> list[int]:
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


def load_weights(path: Path, dtype: torch.dtype, int4: bool = False) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The checkpoint's tensors in `dtype`. With `int4`, the 4-bit matrices a converted GGUF file
    keeps beside its dense weights (`<name>.q4`, `.q4_scale`, `.q4_min`) replace those as int4
    QuantizedWeights; without it the dense weights (exact) are what load."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} has no *.safetensors weights")
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    q4: dict[str, torch.Tensor] = {}
    for file in files:
        if file.name == Q4_FILE and not int4:
            continue  # the dense weights are in the checkpoint itself
        for name, tensor in load_file(str(file)).items():
            if name.endswith((".q4", ".q4_scale", ".q4_min")):
                q4[name] = tensor
            else:
                weights[name] = tensor.to(dtype)
    if not int4:
        return weights
    for name in [n.removesuffix(".q4") for n in q4 if n.endswith(".q4")]:
        nibbles, scale, minimum = q4[name + ".q4"], q4[name + ".q4_scale"], q4[name + ".q4_min"]
        q = torch.stack((nibbles & 15, nibbles >> 4), dim=-1).view(nibbles.shape[0], -1)
        # The kernels' form: W = (q - 8) * scale + zero, zero the value of q = 8.
        weights[name] = int4_weight(q, scale, minimum + 8 * scale)
    return weights


def inv_freq_for(arch: ModelArchConfig) -> torch.Tensor:
    """RoPE inverse frequencies as transformers computes them (default, linear, llama3)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
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
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
