"""Fixtures: tiny random Hugging Face checkpoints written with transformers, and their reference outputs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests share one cache of built-in checkpoints per run unless the caller chose one.
os.environ.setdefault("PUNCTUAL_CACHE", str(Path.home() / ".cache" / "punctual"))

from hf_models import ARCHS, build_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: build_hf_checkpoint(root / name, name) for name in ARCHS}
