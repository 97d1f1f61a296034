"""The architectures Punctual serves, by their Hugging Face class name.

Adding one: a file in this package with an `Architecture` (how its config departs from
Llama's, its weight names) and a line here; the runner, scheduler and kernels' callers do not
change.
"""
from __future__ import annotations

from pathlib import Path

from punctual.models import gemma, granite, llama, moe, phi3, qwen3, smollm3
from punctual.models.config import ModelArchConfig, base_config, read_config
from punctual.models.spec import Architecture

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    llama.LLAMA, llama.MISTRAL, llama.QWEN2, qwen3.QWEN3, gemma.GEMMA, gemma.GEMMA2, gemma.GEMMA3, phi3.PHI3,
    smollm3.SMOLLM3, granite.GRANITE, moe.MIXTRAL, moe.QWEN2_MOE, moe.QWEN3_MOE, moe.OLMOE)}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return ARCHITECTURES[name]


def load_arch_config(path: Path) -> ModelArchConfig:
    """The checkpoint's architecture config, its departures from Llama applied."""
    cfg = read_config(path)
    names = cfg.get("architectures") or []
    name = next((a for a in names if a in ARCHITECTURES), None)
    if name is None:
        raise ValueError(f"unsupported architecture {names or cfg.get('model_type')!r} in {path / 'config.json'}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    arch = base_config(name, path, cfg)
    ARCHITECTURES[name].configure(arch, cfg)
    return arch
