"""A checkpoint's own sampling defaults, from its generation_config.json (as vLLM applies them).

Only the keys the file sets count: a request that leaves temperature out gets the model
author's recommended temperature, not transformers' class default. Explicit request values
always win. EOS ids are read with the architecture (loader.py); the engine core fills them in.
Pure Python: the server's front end reads this without torch.
"""
from __future__ import annotations

import json
from pathlib import Path

# generation_config.json key -> SamplingParams field (vLLM's list).
DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty"}


def generation_defaults(path: Path | str) -> dict[str, float | int]:
    """SamplingParams fields the checkpoint sets; {} when it has no generation_config.json."""
    config_file = Path(path) / "generation_config.json"
    if not config_file.exists():
        return {}
    config = json.loads(config_file.read_text())
    defaults = {field: config[key] for key, field in DEFAULT_KEYS.items()
                if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)}
    if defaults.get("top_k") is not None:
        defaults["top_k"] = int(defaults["top_k"])
    return defaults
