"""A model name -> its checkpoint directory, and the directory's weight tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from punctual.checkpoints.builtin import builtin_path, is_builtin
from punctual.checkpoints.gguf import Q4_FILE, SMOLLM2, gguf_checkpoint, is_gguf_file, smollm2_file
from punctual.kernels.quant import QuantizedWeight, int4_weight
from punctual.models.config import ModelArchConfig
from punctual.models.sharding import TensorShard, finish_shard, shard_plan
from punctual.models.spec import WeightNames


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


def load_weights(path: Path, dtype: torch.dtype, int4: bool = False,
                 only: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The checkpoint's tensors in `dtype`. With `int4`, the 4-bit matrices a converted GGUF file
    keeps beside its dense weights (`<name>.q4`, `.q4_scale`, `.q4_min`) replace those as int4
    QuantizedWeights; without it the dense weights (exact) are what load. `only`: the tensors whose
    names it accepts, each read into memory of its own (pread, not a mapping of the file), so that
    what the caller drops is freed (a sliding window of layers, checkpoints/weight_stream.py)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} has no *.safetensors weights")
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    q4: dict[str, torch.Tensor] = {}
    for file in files:
        if file.name == Q4_FILE and not int4:
            continue  # the dense weights are in the checkpoint itself
        if only is None:
            tensors = load_file(str(file)).items()
        else:
            with safe_open(str(file), framework="pt", backend="pread") as handle:
                tensors = [(name, handle.get_tensor(name)) for name in handle.keys() if only(name)]
        for name, tensor in tensors:
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


def load_shard(path: Path, dtype: torch.dtype, arch: ModelArchConfig, names: WeightNames, rank: int,
               size: int) -> tuple[ModelArchConfig, dict[str, torch.Tensor]]:
    """(rank's architecture, rank's tensors in `dtype`) of a tensor-parallel split, read tensor by
    tensor: a split tensor's rows and columns through safetensors' get_slice (a memory-mapped view,
    of which only the rank's part is copied), so a rank never holds a whole split tensor and its
    peak memory is its shard plus the replicated parts. Dense weights only (a GGUF file's 4-bit
    blocks do not split by head: its converted dense checkpoint is split, then quantized)."""
    weights = read_shard(path, dtype, shard_plan(arch, names, rank, size))
    return finish_shard(arch, weights, names, rank, size)


def read_shard(path: Path, dtype: torch.dtype, plan: dict[str, TensorShard],
               only: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a rank keeps (`plan`: shard_plan's) in `dtype`, as read for load_shard, before
    finish_shard. `only`: the tensors whose names it accepts, each in memory of its own (pread,
    not a mapping of the file), so that what the caller drops is freed (one layer of a rank's
    sliding window, checkpoints/weight_stream.py)."""
    from safetensors import safe_open

    files = [file for file in sorted(path.glob("*.safetensors")) if file.name != Q4_FILE]
    if not files:
        raise FileNotFoundError(f"checkpoint {path} has no *.safetensors weights")
    options = {} if only is None else {"backend": "pread"}
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", **options) as handle:
            for name in handle.keys():
                if only is not None and not only(name):
                    continue
                if name in plan:
                    view = handle.get_slice(name)
                    weights[name] = plan[name].take(view, view.get_shape(), dtype)
                else:  # kept whole: a lazy view of the file, as load_weights gives
                    weights[name] = handle.get_tensor(name).to(dtype)
    return weights
