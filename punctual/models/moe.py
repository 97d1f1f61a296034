"""Mixtures of experts: Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE and OLMoE.

Their attention is Llama's (Qwen3-MoE adds Qwen3's per-head q/k norms; OLMoE norms q and k
over all heads and may clip q, k, v); the MLP of their sparse layers is a router over experts,
which decoder.MoEBlock runs.
"""
from __future__ import annotations

from punctual.models.config import ModelArchConfig, MoEConfig
from punctual.models.llama import windows_if_enabled
from punctual.models.spec import Architecture, WeightNames


def _num_experts(cfg: dict) -> int:
    return cfg.get("num_experts") or cfg.get("num_local_experts") or 0


def _sparse_layers(arch: ModelArchConfig, cfg: dict) -> list[bool]:
    """Qwen's rule: a layer is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
    skip, step = set(cfg.get("mlp_only_layers") or []), cfg.get("decoder_sparse_step") or 1
    return [i not in skip and (i + 1) % step == 0 for i in range(arch.num_layers)]


def _mixtral(arch: ModelArchConfig, cfg: dict) -> None:
    arch.moe = MoEConfig(_num_experts(cfg), cfg["num_experts_per_tok"], arch.intermediate_size, norm_topk_prob=True)
    arch.moe_layers = [True] * arch.num_layers


def _qwen2_moe(arch: ModelArchConfig, cfg: dict) -> None:
    windows_if_enabled(arch, cfg)
    arch.moe = MoEConfig(_num_experts(cfg), cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                         cfg.get("norm_topk_prob", False), cfg.get("shared_expert_intermediate_size") or 0)
    arch.moe_layers = _sparse_layers(arch, cfg)


def _qwen3_moe(arch: ModelArchConfig, cfg: dict) -> None:
    windows_if_enabled(arch, cfg)
    arch.qk_norm = "head"
    arch.moe = MoEConfig(_num_experts(cfg), cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                         cfg.get("norm_topk_prob", False))
    arch.moe_layers = _sparse_layers(arch, cfg)


def _olmoe(arch: ModelArchConfig, cfg: dict) -> None:
    arch.qk_norm = "full"
    arch.clip_qkv = cfg.get("clip_qkv")
    arch.moe = MoEConfig(_num_experts(cfg), cfg["num_experts_per_tok"], arch.intermediate_size,
                         cfg.get("norm_topk_prob", False))
    arch.moe_layers = [True] * arch.num_layers


MIXTRAL = Architecture("MixtralForCausalLM", _mixtral,
                       WeightNames(mlp=("block_sparse_moe.", "mlp."), expert_gate="w1", expert_up="w3", expert_down="w2"))
QWEN2_MOE = Architecture("Qwen2MoeForCausalLM", _qwen2_moe)
QWEN3_MOE = Architecture("Qwen3MoeForCausalLM", _qwen3_moe)
OLMOE = Architecture("OlmoeForCausalLM", _olmoe)
