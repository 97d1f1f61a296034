"""A sparse MLP: the router's top-k experts per token, each expert run once over its tokens.

The step's tokens are grouped by expert, so each active expert's weights are read once per
step whatever the batch (a decode step at small batch is bound by reading the active experts'
bytes, not all of them), and experts the step does not route to are never touched. Outputs are
summed per token in ascending expert order, as transformers does, so float32 output is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from punctual.models.config import MoEConfig
from punctual.models.linear import Weight, linear
from punctual.models.spec import WeightNames


@dataclass
class MoEWeights:
    router: Weight  # [E, hidden]: never quantized (its logits decide the routing); packed for its kernel
    gate_up: list[Weight]  # per expert [2I, hidden]: gate rows, then up rows
    down: list[Weight]  # per expert [hidden, I]
    shared_gate_up: Weight | None = None  # Qwen2-MoE's shared expert
    shared_down: Weight | None = None
    shared_gate: torch.Tensor | None = None  # [1, hidden]: sigmoid gate of the shared expert

    @classmethod
    def take(cls, weights: dict, mlp: str, names: WeightNames, moe: MoEConfig, take, maybe, layer: int) -> "MoEWeights":
        """Read a sparse layer's tensors: experts fused as transformers >= 5 keeps them
        (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) or one by one (experts.N.*)."""
        experts = mlp + names.experts + "."
        if experts + "gate_up_proj" in weights:
            fused_gate_up, fused_down = take(experts + "gate_up_proj"), take(experts + "down_proj")
            if fused_gate_up.shape[0] != moe.num_experts:
                raise ValueError(f"layer {layer} has {fused_gate_up.shape[0]} experts, the config says {moe.num_experts}")
            gate_up = [fused_gate_up[e].contiguous() for e in range(moe.num_experts)]
            down = [fused_down[e].contiguous() for e in range(moe.num_experts)]
        else:
            gate_up, down = [], []
            for e in range(moe.num_experts):
                prefix = f"{experts}{e}."
                gate_up.append(torch.cat([take(prefix + names.expert_gate + ".weight"),
                                          take(prefix + names.expert_up + ".weight")]).contiguous())
                down.append(take(prefix + names.expert_down + ".weight"))
        shared_gate_up = shared_down = shared_gate = None
        if moe.shared_intermediate_size:
            shared = mlp + names.shared_expert + "."
            shared_gate_up = torch.cat([take(shared + names.gate + ".weight"), take(shared + names.up + ".weight")])
            shared_down = take(shared + names.down + ".weight")
            shared_gate = take(mlp + names.shared_expert_gate + ".weight")
        return cls(take(mlp + names.router + ".weight"), gate_up, down, shared_gate_up, shared_down, shared_gate)

    def linear_slots(self):
        """(owner, index-or-attribute) pairs, as the decoder's weight finishing walks them."""
        for e in range(len(self.gate_up)):
            yield _ListSlot(self.gate_up, e), "weight"
            yield _ListSlot(self.down, e), "weight"
        if self.shared_gate_up is not None:
            yield self, "shared_gate_up"
            yield self, "shared_down"


class _ListSlot:
    """One element of a list, settable as an attribute (so experts are finished like any linear)."""

    def __init__(self, items: list, index: int):
        self.items, self.index = items, index

    @property
    def weight(self):
        return self.items[self.index]

    @weight.setter
    def weight(self, value) -> None:
        self.items[self.index] = value


DenseMLP = Callable[[torch.Tensor, Weight, torch.Tensor | None, Weight, torch.Tensor | None], torch.Tensor]


def route(x: torch.Tensor, router: torch.Tensor, moe: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [T, k] and their weights [T, k]: softmax over all experts in
    float32, top-k, renormalised where the config says (Mixtral always)."""
    probs = torch.softmax(linear(x, router), dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


def moe_forward(x: torch.Tensor, weights: MoEWeights, moe: MoEConfig, dense_mlp: DenseMLP) -> torch.Tensor:
    """x [T, hidden] -> the sparse MLP's output [T, hidden]."""
    experts, expert_weights = route(x, weights.router, moe)
    # In the model dtype, as Qwen-MoE and OLMoE round them (Mixtral keeps float32: in float32 models
    # the same thing; in bf16 the last bit of a product may differ).
    expert_weights = expert_weights.to(x.dtype)
    if x.shape[0] == 1:  # one token (a single stream's decode): its k experts in ascending order, no grouping
        out = None
        for slot, expert in sorted(enumerate(experts[0].tolist()), key=lambda item: item[1]):
            h = dense_mlp(x, weights.gate_up[expert], None, weights.down[expert], None) * expert_weights[0, slot]
            out = h if out is None else out + h
    else:
        out = _grouped(x, weights, moe, experts, expert_weights, dense_mlp)
    if weights.shared_gate_up is not None:
        shared = dense_mlp(x, weights.shared_gate_up, None, weights.shared_down, None)
        out = out + torch.sigmoid(torch.nn.functional.linear(x, weights.shared_gate)) * shared
    return out


def _grouped(x: torch.Tensor, weights: MoEWeights, moe: MoEConfig, experts: torch.Tensor,
             expert_weights: torch.Tensor, dense_mlp: DenseMLP) -> torch.Tensor:
    """Tokens grouped by expert: each routed expert runs once over its tokens, summed per token in
    ascending expert order."""
    out = torch.zeros_like(x)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # token slots grouped by expert, in token order
    counts = torch.bincount(flat, minlength=moe.num_experts).tolist()
    token_of_slot = order // moe.top_k
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        tokens = token_of_slot[start:start + count]
        start += count
        h = dense_mlp(x[tokens], weights.gate_up[expert], None, weights.down[expert], None)
        h = h * expert_weights.reshape(-1)[slots, None]
        out.index_add_(0, tokens, h.to(out.dtype))
    return out
