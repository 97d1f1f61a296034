"""A model under a weight budget (`max_weight_memory`): the embeddings, final norm and head stay
resident, and a sliding window of decoder layers is read from the checkpoint ahead of use
(TPI-LLM's sliding window; the window itself is models/weight_window.py).

Each layer is finished once at start-up as a resident model's layers are (dtype, fused q/k/v and
gate/up, quantization, the kernels' packing) and written to a per-layer cache on disk
(checkpoints/layer_cache.py); the window's thread reads those files back (pread into memory of
their own, so that dropping a layer frees it) while earlier layers compute.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch

from punctual.checkpoints import layer_cache
from punctual.checkpoints.gguf import Q4_FILE
from punctual.checkpoints.loader import load_weights
from punctual.models.config import ModelArchConfig
from punctual.models.decoder import DecoderModel
from punctual.models.registry import architecture
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


def load_model(path: Path, arch: ModelArchConfig, device: torch.device, dtype: torch.dtype, int4: bool,
               budget: int, **model_options) -> DecoderModel:
    """The model under `budget` bytes of weights: every layer resident where all fit, else a
    sliding window of layers (model.layers is then a WeightWindow). ValueError where the budget
    holds less than the resident part and two layers."""
    layer_of = _layer_of(architecture(arch.architecture).names.layer)
    model = DecoderModel(arch, load_weights(path, dtype, int4, only=lambda name: layer_of(name) is None),
                         device, dtype, resident_layers=False, **model_options)
    fixed = resident_bytes([model.embed, model.norm, model.lm_head, model.rope_tables])
    convert = lambda index: model.load_layer(  # noqa: E731
        index, load_weights(path, dtype, int4, only=lambda name: layer_of(name) == index))
    key = layer_cache.cache_key(path, device, dtype, int4, model.kernels is not None, model_options)
    cache = layer_cache.CachedLayers(layer_cache.cache_dir(path, key), key, device, convert)
    # Layer 0 read once to measure what a layer costs finished (packing may hold two layouts); the
    # others scaled by their share of the checkpoint's elements (MoE and dense layers differ).
    first_layer = cache.cached(0)
    built = {} if first_layer is not None else {0: (first_layer := convert(0))}
    first = resident_bytes(first_layer)
    del first_layer
    elements = _elements_per_layer(path, arch.num_layers, int4, layer_of)
    layer_bytes = [first * count / max(elements[0], 1) for count in elements]
    largest, num_layers = max(layer_bytes), arch.num_layers
    if fixed + sum(layer_bytes) <= budget:
        logger.info("max_weight_memory %.0f MB holds the whole model (%.0f MB): every layer resident",
                    budget / MB, (fixed + sum(layer_bytes)) / MB)
        del model, convert, cache, built  # the resident model reads its weights anew
        return DecoderModel(arch, load_weights(path, dtype, int4), device, dtype, **model_options)
    window = min(num_layers, int((budget - fixed) // largest)) if budget > fixed else 0
    if window < 2:
        raise ValueError(
            f"max_weight_memory of {budget / MB:.1f} MB is too small for this model: the embeddings, final norm "
            f"and head take {fixed / MB:.1f} MB and a window needs at least 2 layers of up to {largest / MB:.1f} MB "
            f"each; give at least {(fixed + 2 * largest) / MB:.1f} MB (the whole model: "
            f"{(fixed + sum(layer_bytes)) / MB:.1f} MB)")
    written = cache.fill(num_layers, built)
    del built
    if cache.enabled:
        logger.info("layer cache: %s, %d finished layers, %.0f MB on disk (%d written now); a window reads "
                    "them back with no conversion", cache.directory, num_layers,
                    layer_cache.directory_bytes(cache.directory) / MB, written)
    model.layers = WeightWindow(num_layers, window, cache.read)
    logger.info("weight window: %d of %d layers, %.0f MB (%.0f MB resident: embeddings, final norm, head; "
                "layers of up to %.1f MB read ahead on a background thread; the whole model %.0f MB). "
                "The whole-stack decode kernel is off: it needs every layer resident",
                window, num_layers, (fixed + window * largest) / MB, fixed / MB, largest / MB,
                (fixed + sum(layer_bytes)) / MB)
    return model
