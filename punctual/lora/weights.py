"""A PEFT LoRA adapter as the decoder stack applies it, and the batched low-rank terms of a step.

The base GEMM runs once for every row of a step; then each adapter in the step adds its low-rank
term to its own rows only (Punica's SGMV shape, in PyTorch ops): gather the rows, shrink by A,
expand by B, scatter-add into the output. The base weights are never copied or merged.

The decoder stacks q, k and v (and gate and up) into one GEMM, so an adapter's A matrices of a
stacked linear are concatenated (one shrink GEMM) and each B expands into its own slice of the
output columns. A fused projection in the checkpoint (Phi-3's qkv_proj) is one part over all of them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from punctual.lora.request import LoRARequest
from punctual.models.config import ModelArchConfig
from punctual.models.spec import WeightNames

# The decoder's linears a LoRA can target: LayerWeights' field names.
SLOTS = ("qkv", "o_proj", "gate_up", "down")


@dataclass
class LoRALinear:
    """One adapted linear of one layer: A of every part stacked [R, in], and per part the output
    columns it adds to, its rows of the shrunk activations, and B transposed, [r, columns], with the
    scale folded in (the expand then runs along contiguous output columns)."""

    a: torch.Tensor
    parts: list[tuple[int, int, int, int, torch.Tensor]]  # (col_start, col_end, rank_start, rank_end, b.T)


@dataclass
class LoRAAdapter:
    request: LoRARequest
    rank: int
    layers: list[dict[str, LoRALinear]] = field(default_factory=list)  # per layer: slot -> weights

    @property
    def nbytes(self) -> int:
        return sum(lin.a.nbytes + sum(p[4].nbytes for p in lin.parts) for layer in self.layers for lin in layer.values())


def _targets(arch: ModelArchConfig, names: WeightNames) -> dict[str, tuple[str, int, int, int]]:
    """Module name -> (slot, first output column, columns, input features) for each projection
    this architecture has."""
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    hidden, inter = arch.hidden_size, arch.intermediate_size
    targets = {names.o: ("o_proj", 0, hidden, q_size), names.down: ("down", 0, hidden, inter)}
    if names.qkv is not None:
        targets[names.qkv] = ("qkv", 0, q_size + 2 * kv_size, hidden)
    else:
        targets.update({names.q: ("qkv", 0, q_size, hidden), names.k: ("qkv", q_size, kv_size, hidden),
                        names.v: ("qkv", q_size + kv_size, kv_size, hidden)})
    if names.gate_up is not None:
        targets[names.gate_up] = ("gate_up", 0, 2 * inter, hidden)
    else:
        targets.update({names.gate: ("gate_up", 0, inter, hidden), names.up: ("gate_up", inter, inter, hidden)})
    return targets


def read_adapter_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.is_file():
        raise ValueError(f"LoRA adapter path {str(path)!r}: no adapter_config.json there (PEFT's format: "
                         "adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"LoRA adapter {str(path)!r}: cannot read adapter_config.json: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {str(path)!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, unsupported in (("use_dora", True), ("rank_pattern", None), ("alpha_pattern", None),
                             ("modules_to_save", None)):
        if config.get(key) and (unsupported is None or config[key] == unsupported):
            raise ValueError(f"LoRA adapter {str(path)!r}: {key} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {str(path)!r}: bias {config['bias']!r} is not supported (only 'none')")
    return config


def load_adapter(request: LoRARequest, arch: ModelArchConfig, names: WeightNames, max_rank: int,
                 device: torch.device, dtype: torch.dtype) -> LoRAAdapter:
    """Read and check a PEFT adapter against the base model; ValueError naming the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(request.lora_path)
    config = read_adapter_config(path)
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {request.lora_name!r}: rank {rank} is above max_lora_rank {max_rank}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ValueError(f"LoRA adapter path {str(path)!r}: no adapter_model.safetensors there")
    try:
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"LoRA adapter {request.lora_name!r}: cannot read adapter_model.safetensors: {exc}") from None

    targets = _targets(arch, names)
    layer_prefix, layer_of = names.layer.split("{i}")
    # layer i -> slot -> [(col_start, cols, A, B)]
    found: list[dict[str, list]] = [{} for _ in range(arch.num_layers)]
    for key, tensor in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." in key:
                continue
            raise ValueError(f"LoRA adapter {request.lora_name!r}: tensor {key!r} is not a LoRA A or B matrix "
                             "(embedding or bias adapters are not supported)")
        module_path = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        module = module_path.rsplit(".", 1)[-1]
        if module not in targets:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: target module {module!r} is not one this model "
                             f"({arch.architecture}) can adapt (supported: {', '.join(targets)})")
        layer_index = None
        if module_path.startswith(layer_prefix):
            head = module_path[len(layer_prefix):].split(".", 1)[0]
            layer_index = int(head) if head.isdigit() else None
        if layer_index is None or layer_index >= arch.num_layers:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {module_path!r} is not a layer of the base model")
        slot, col_start, cols, in_features = targets[module]
        if slot in ("gate_up", "down") and arch.moe is not None and arch.moe_layers[layer_index]:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: layer {layer_index} has experts, "
                             f"not a dense MLP to adapt with {module!r}")
        a, b = tensor, tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {key!r} has no lora_B matrix")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] > max_rank:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {module_path} has A {tuple(a.shape)} and "
                             f"B {tuple(b.shape)}, not a LoRA of rank <= {max_rank}")
        if a.shape[1] != in_features or b.shape[0] != cols:
            raise ValueError(f"LoRA adapter {request.lora_name!r} does not fit the base model: {module_path} is "
                             f"{in_features} -> {cols} there, the adapter's A is {tuple(a.shape)} and B "
                             f"{tuple(b.shape)} (an adapter of another base model?)")
        found[layer_index].setdefault(slot, []).append((col_start, cols, a, b))

    if not any(found):
        raise ValueError(f"LoRA adapter {request.lora_name!r}: adapter_model.safetensors holds no LoRA weights")
    adapter = LoRAAdapter(request, rank)
    for layer in found:
        adapted = {}
        for slot, parts in layer.items():
            parts.sort(key=lambda part: part[0])
            a_all = torch.cat([a for _, _, a, _ in parts]).to(device=device, dtype=dtype).contiguous()
            packed, rank_start = [], 0
            for col_start, cols, a, b in parts:
                # The scale folded into B in float32, once, not per step.
                b_scaled = (b.float() * scale).T.to(device=device, dtype=dtype).contiguous()
                packed.append((col_start, col_start + cols, rank_start, rank_start + a.shape[0], b_scaled))
                rank_start += a.shape[0]
            adapted[slot] = LoRALinear(a_all, packed)
        adapter.layers.append(adapted)
    return adapter


class LoRAStep:
    """The adapters of one step and their rows: a list of (rows or None for every row, adapter).
    Rows of the base model are in no group.

    With the fused CPU kernels (`kernels`), each linear's terms for every adapter are one call of
    torch.ops.punctual.lora_sgmv_ (kernels/csrc/lora.h); its arguments are built once per step
    and set of adapters. Otherwise (CUDA, no kernels) the PyTorch ops below, a few per adapter."""

    __slots__ = ("groups", "num_rows", "kernels", "_rows", "_parts")

    def __init__(self, groups: list[tuple[torch.Tensor | None, LoRAAdapter]], num_rows: int = 0, kernels=None):
        self.groups = groups
        self.num_rows = num_rows
        self.kernels = kernels
        self._rows: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # groups -> (rows, offsets)
        self._parts: dict[tuple, torch.Tensor] = {}  # the parts' ranges -> [P, 5]

    def add(self, out: torch.Tensor, x: torch.Tensor, layer: int, slot: str) -> torch.Tensor:
        """out [T, N] (the base linear of x [T, in]) plus each adapter's term on its rows, in place."""
        if (self.kernels is not None and out.dtype == x.dtype and out.device.type == "cpu"
                and out.stride(1) == 1 and x.stride(1) == 1):
            return self._add_fused(out, x, layer, slot)
        for rows, adapter in self.groups:
            lin = adapter.layers[layer].get(slot)
            if lin is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            shrunk = xs @ lin.a.T  # [n, R]: every part's A at once
            for col_start, col_end, rank_start, rank_end, b in lin.parts:
                delta = shrunk[:, rank_start:rank_end] @ b  # [n, cols]
                if rows is None:
                    out[:, col_start:col_end] += delta
                else:
                    out[:, col_start:col_end].index_add_(0, rows, delta)
        return out

    def _add_fused(self, out: torch.Tensor, x: torch.Tensor, layer: int, slot: str) -> torch.Tensor:
        present, a, b, ranges = [], [], [], []
        for g, (_, adapter) in enumerate(self.groups):
            lin = adapter.layers[layer].get(slot)
            if lin is None:
                continue
            group = len(present)
            present.append(g)
            a.append(lin.a)
            for col_start, col_end, rank_start, rank_end, part_b in lin.parts:
                ranges.append((group, col_start, col_end, rank_start, rank_end))
                b.append(part_b)
        if not present:
            return out
        key = tuple(present)
        rows_offsets = self._rows.get(key)
        if rows_offsets is None:
            every = torch.arange(out.shape[0], dtype=torch.long)
            chosen = [every if self.groups[g][0] is None else self.groups[g][0] for g in present]
            offsets = [0]
            for rows in chosen:
                offsets.append(offsets[-1] + rows.numel())
            rows_offsets = self._rows[key] = (torch.cat(chosen), torch.tensor(offsets, dtype=torch.long))
        parts_key = tuple(ranges)
        parts = self._parts.get(parts_key)
        if parts is None:
            parts = self._parts[parts_key] = torch.tensor(ranges, dtype=torch.long)
        return self.kernels.lora_sgmv_(out, x, rows_offsets[0], rows_offsets[1], a, parts, b)
