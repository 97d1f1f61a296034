"""What an architecture file states: how its config departs from Llama's, and its weight names."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from punctual.models.config import ModelArchConfig


@dataclass(frozen=True)
class WeightNames:
    """Where the shared decoder stack finds each tensor, Llama's names by default. A layer's names
    are relative to `layer` (formatted with the layer index); None: the architecture has none."""

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: str = "model.layers.{i}."
    input_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"  # the norm before the MLP
    attn_out_norm: str | None = None  # Gemma 2/3: on the attention output, before the residual add
    mlp_out_norm: str | None = None  # Gemma 2/3: on the MLP output
    attn: str = "self_attn."
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None  # one fused projection (Phi-3), rows q, k, v
    o: str = "o_proj"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    mlp: tuple[str, ...] = ("mlp.",)  # prefixes tried in order (Mixtral's files say block_sparse_moe.)
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None  # one fused projection (Phi-3), rows gate, up
    router: str = "gate"
    experts: str = "experts"
    # One expert's projections in per-expert checkpoints (experts.N.<name>); transformers >= 5
    # keeps them fused as experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I].
    expert_gate: str = "gate_proj"
    expert_up: str = "up_proj"
    expert_down: str = "down_proj"
    shared_expert: str = "shared_expert"
    shared_expert_gate: str = "shared_expert_gate"


def _no_change(arch: ModelArchConfig, cfg: dict) -> None:
    pass


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face architecture: its class name, how its config.json departs from Llama's
    reading of it (`configure` edits the base config in place) and its weight names."""

    name: str
    configure: Callable[[ModelArchConfig, dict], None] = _no_change
    names: WeightNames = field(default_factory=WeightNames)
