"""A model under a weight budget (`max_weight_memory`): the embeddings, final norm and head stay
resident, and a sliding window of decoder layers is read from the checkpoint ahead of use
(TPI-LLM's sliding window; the window itself is models/weight_window.py). Under tensor
parallelism each rank does this for its own shard, within its own budget, with its own cache.

Each layer is finished once at start-up as a resident model's layers are (dtype, fused q/k/v and
gate/up, quantization, the kernels' packing) and written to a per-layer cache on disk
(checkpoints/layer_cache.py); the window's thread reads those files back (pread into memory of
their own, so that dropping a layer frees it) while earlier layers compute.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import torch

from punctual.checkpoints import layer_cache
from punctual.checkpoints.gguf import Q4_FILE
from punctual.checkpoints.loader import load_weights, read_shard
from punctual.models.collectives import RankGroup
from punctual.models.config import ModelArchConfig
from punctual.models.decoder import DecoderModel
from punctual.models.registry import architecture
from punctual.models.sharding import finish_shard, shard_plan
from punctual.models.weight_window import WeightWindow

logger = logging.getLogger(__name__)

MB = 1e6


def resident_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors `obj` holds (dataclasses, lists and tuples walked), each storage once
    (a cached layer's tensors view one buffer: counted once, whole)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        # mkldnn tensors have no data_ptr
        key = obj.untyped_storage().data_ptr() if obj.layout == torch.strided else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.layout == torch.strided else obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(resident_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(resident_bytes(item, seen) for item in obj)
    return 0


def _layer_of(layer_template: str):
    """name -> its decoder layer's index, or None for the embeddings, final norm and head."""
    pattern = re.compile(re.escape(layer_template).replace(re.escape("{i}"), r"(\d+)"))

    def layer_of(name: str) -> int | None:
        match = pattern.match(name)
        return int(match.group(1)) if match else None
    return layer_of


def _elements_per_layer(path: Path, num_layers: int, int4: bool, layer_of) -> list[int]:
    """Each layer's tensor elements in the checkpoint, from the files' headers (nothing is read)."""
    from safetensors import safe_open

    elements = [0] * num_layers
    for file in sorted(path.glob("*.safetensors")):
        if file.name == Q4_FILE and not int4:
            continue
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                index = layer_of(name)
                if index is not None and index < num_layers:
                    elements[index] += _numel(handle.get_slice(name).get_shape())
    return elements


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _megabytes_up(size: float) -> str:
    """`size` in MB rounded up to a tenth: a budget of the figure printed fits."""
    return f"{math.ceil(size / MB * 10) / 10:.1f}"


def load_model(path: Path, arch: ModelArchConfig, device: torch.device, dtype: torch.dtype, int4: bool,
               budget: int, tensor_parallel: RankGroup | None = None, **model_options) -> DecoderModel:
    """The model under `budget` bytes of weights: every layer resident where all fit, else a
    sliding window of layers (model.layers is then a WeightWindow). ValueError where the budget
    holds less than the resident part and two layers. `tensor_parallel`: this process's rank of a
    group; the model is then the rank's shard (models/sharding.py) and `budget` is the rank's."""
    names = architecture(arch.architecture).names
    layer_of = _layer_of(names.layer)
    is_fixed = lambda name: layer_of(name) is None  # noqa: E731
    if tensor_parallel is None:
        read = lambda only: load_weights(path, dtype, int4, only=only)  # noqa: E731
        shard_arch, fixed_weights = arch, read(is_fixed)
    else:  # the rank's rows and columns of each tensor (dense: quantized after the split, as resident)
        rank, size = tensor_parallel.rank, tensor_parallel.size
        plan = shard_plan(arch, names, rank, size)
        read = lambda only: read_shard(path, dtype, plan, only=only)  # noqa: E731
        shard_arch, fixed_weights = finish_shard(arch, read(is_fixed), names, rank, size)
        int4 = False
    model = DecoderModel(shard_arch, fixed_weights, device, dtype, tensor_parallel=tensor_parallel,
                         resident_layers=False, **model_options)
    fixed = resident_bytes([model.embed, model.norm, model.lm_head, model.rope_tables])
    convert = lambda index: model.load_layer(index, read(lambda name: layer_of(name) == index))  # noqa: E731
    shard = None if tensor_parallel is None else (tensor_parallel.rank, tensor_parallel.size)
    key = layer_cache.cache_key(path, device, dtype, int4, model.kernels is not None, model_options, shard)
    cache = layer_cache.CachedLayers(layer_cache.cache_dir(path, key, shard), key, device, convert)
    # Layer 0 read once to measure what a layer costs finished (packing may hold two layouts); the
    # others scaled by their share of the checkpoint's elements (MoE and dense layers differ; a
    # rank's share of each layer is the same fraction, as the split is by heads and columns).
    first_layer = cache.cached(0)
    built = {} if first_layer is not None else {0: (first_layer := convert(0))}
    first = resident_bytes(first_layer)
    del first_layer
    elements = _elements_per_layer(path, arch.num_layers, int4, layer_of)
    layer_bytes = [first * count / max(elements[0], 1) for count in elements]
    largest, num_layers = max(layer_bytes), arch.num_layers
    whole = fixed + sum(layer_bytes)
    # Under tensor parallelism every figure is one rank's: its shard, its budget.
    who = "" if shard is None else f"tensor-parallel rank {shard[0]} of {shard[1]}: "
    per_rank = "" if shard is None else " per rank"
    if whole <= budget:
        logger.info("%smax_weight_memory %.0f MB holds the whole %s (%.0f MB): every layer resident", who,
                    budget / MB, "model" if shard is None else "shard", whole / MB)
        del model, convert, cache, built  # the resident model reads its weights anew
        if tensor_parallel is None:
            return DecoderModel(arch, load_weights(path, dtype, int4), device, dtype, **model_options)
        shard_arch, weights = finish_shard(arch, read(None), names, shard[0], shard[1])
        return DecoderModel(shard_arch, weights, device, dtype, tensor_parallel=tensor_parallel, **model_options)
    window = min(num_layers, int((budget - fixed) // largest)) if budget > fixed else 0
    if window < 2:
        what = "this model" if shard is None else f"rank {shard[0]}'s shard of this model (the budget is per rank)"
        raise ValueError(
            f"max_weight_memory of {budget / MB:.1f} MB is too small for {what}: the embeddings, final norm "
            f"and head take {fixed / MB:.1f} MB and a window needs at least 2 layers of up to {largest / MB:.1f} MB "
            f"each; give at least {_megabytes_up(fixed + 2 * largest)} MB{per_rank} (the whole "
            f"{'model' if shard is None else 'shard'}: {whole / MB:.1f} MB)")
    written = cache.fill(num_layers, built)
    del built
    if cache.enabled:
        logger.info("%slayer cache: %s, %d finished layers, %.0f MB on disk (%d written now); a window reads "
                    "them back with no conversion", who, cache.directory, num_layers,
                    layer_cache.directory_bytes(cache.directory) / MB, written)
    model.layers = WeightWindow(num_layers, window, cache.read)
    logger.info("%sweight window: %d of %d layers, %.0f MB%s (%.0f MB resident: embeddings, final norm, head; "
                "layers of up to %.1f MB read ahead on a background thread; the whole %s %.0f MB). "
                "The whole-stack decode kernel is off: it needs every layer resident",
                who, window, num_layers, (fixed + window * largest) / MB, per_rank, fixed / MB, largest / MB,
                "model" if shard is None else "shard", whole / MB)
    return model
