"""Finished decoder layers on disk, for a sliding window of layers (checkpoints/weight_stream.py).

A windowed step reads every layer again. Finishing a layer from the checkpoint (dtype, fused
q/k/v and gate/up, quantization, the kernels' packing) costs far more than reading its bytes,
so each layer is finished once, at start-up, and written as it will be used: one safetensors
file per layer, its tensors plus the structure (which dataclass holds which tensor) as JSON in
the file's metadata. Reading one back is reading its bytes (one read into memory of its own, so
dropping the layer frees it, the GIL released while it reads); nothing is unpickled, and only
the classes below are rebuilt.

Files live in PUNCTUAL_CACHE/layers/<model>-<key>/ (<model>-tp<rank>of<N>-<key>/ for one rank's
shard under tensor parallelism: each rank its own folder), the key over everything that changes
the finished bytes: the checkpoint's path and its files' sizes and mtimes, device, dtype,
quantization and the other model options, the tensor-parallel shard, the kernels' build and table,
torch's version and FORMAT_VERSION. Folders of older keys stay until deleted by hand. Every file is
written under a name of its own and renamed into place, so processes that start together on one
folder (the ranks of a group, two servers) each see a layer's file whole or not at all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import torch

from punctual.checkpoints.builtin import cache_root as punctual_cache_root
from punctual.kernels import cpu_kernels
from punctual.kernels.quant import QuantizedWeight
from punctual.kernels.tune_table import KernelTable, kernel_table
from punctual.models.decoder import LayerWeights
from punctual.models.linear import FusedWeight
from punctual.models.moe_block import MoEWeights

logger = logging.getLogger(__name__)

# Bumped whenever what a file holds, or how a layer is finished, changes.
FORMAT_VERSION = 1
META = "punctual_layer"
_CLASSES = {cls.__name__: cls for cls in (LayerWeights, FusedWeight, QuantizedWeight, MoEWeights)}


class CacheUnsupported(ValueError):
    """A finished layer holds something the cache cannot write (the window then reads the checkpoint)."""


def cache_root() -> Path:
    return punctual_cache_root() / "layers"


def cache_key(path: Path, device: torch.device, dtype: torch.dtype, int4: bool, kernels: bool,
              options: dict, shard: tuple[int, int] | None = None) -> str:
    """A digest of what decides a finished layer's bytes. A file rewritten in place changes its
    mtime (and usually its size): the key changes, and the layers are finished anew. `shard`:
    (rank, tensor_parallel_size) where the layers are one rank's shard."""
    path = path.resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    parts = {
        "format": FORMAT_VERSION, "torch": torch.__version__, "path": str(path), "files": files,
        "device": device.type, "dtype": str(dtype), "int4": int4,
        "options": sorted((k, repr(v)) for k, v in options.items()),
        "kernels": [_kernels_build(), repr(kernel_table())] if kernels else None,
    }
    if shard is not None:  # absent for a whole model: its keys (and folders) stay as they were
        parts["shard"] = list(shard)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _kernels_build() -> str | None:
    """The loaded kernels' build (variant and a digest of their sources): their packed layouts."""
    try:
        return cpu_kernels.build(variant=cpu_kernels.choose_variant()).parent.name  # built already: no compile
    except (cpu_kernels.KernelsUnavailable, ValueError):
        return cpu_kernels.loaded_variant()


def cache_dir(path: Path, key: str, shard: tuple[int, int] | None = None) -> Path:
    """The folder of a key's layers; a rank's shard (rank, size) is named in it, for whoever lists them."""
    label = "" if shard is None else f"-tp{shard[0]}of{shard[1]}"
    return cache_root() / f"{path.resolve().name}{label}-{key}"


def layer_file(directory: Path, index: int) -> Path:
    return directory / f"layer-{index:04d}.safetensors"


# ---- encoding: a layer's dataclasses <-> (tensors by name, a JSON tree) -----------------------
def _encode(obj, tensors: dict, seen: dict, name: str):
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):  # inf (a FusedWeight's max_rows in batch-invariant mode) is not JSON
        return {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise CacheUnsupported(f"{name} is a {obj.layout} tensor")
        key = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride())
        if key not in seen:
            # safetensors refuses tensors that share memory: a view (an expert sliced from the
            # fused expert tensor) is written as a copy of its own.
            shared = obj.untyped_storage().nbytes() != obj.nbytes or not obj.is_contiguous()
            tensors[name] = obj.contiguous().clone() if shared else obj
            seen[key] = name
        return {"tensor": seen[key]}
    if isinstance(obj, KernelTable):
        if obj != kernel_table():
            raise CacheUnsupported(f"{name} is a kernel table other than this CPU's")
        return {"kernel_table": True}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple":
                [_encode(item, tensors, seen, f"{name}.{i}") for i, item in enumerate(obj)]}
    if dataclasses.is_dataclass(obj) and type(obj).__name__ in _CLASSES:
        fields = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if isinstance(obj, QuantizedWeight) and field.name == "gemm":
                fields["gemm"] = None  # oneDNN's opaque int8 layout: rebuilt by the first big batch that runs it
            else:
                fields[field.name] = _encode(value, tensors, seen, f"{name}.{field.name}")
        return {"class": type(obj).__name__, "fields": fields}
    raise CacheUnsupported(f"{name} is a {type(obj).__name__}")


def _decode(tree, tensors: dict):
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "float" in tree:
        return float(tree["float"])
    if "kernel_table" in tree:
        return kernel_table()
    if "list" in tree:
        return [_decode(item, tensors) for item in tree["list"]]
    if "tuple" in tree:
        return tuple(_decode(item, tensors) for item in tree["tuple"])
    cls = _CLASSES[tree["class"]]  # KeyError for any other name: never an arbitrary class
    return cls(**{k: _decode(v, tensors) for k, v in tree["fields"].items()})


def write_layer(file: Path, layer: LayerWeights, key: str, index: int) -> None:
    """Write atomically (a temporary file of this process and thread, renamed): a file that exists
    is whole, whichever of several writers of it renames last."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(layer, tensors, {}, "layer")
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        save_file(tensors, str(partial), metadata={META: json.dumps(tree), "key": key, "layer": str(index)})
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_safetensors(file: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, its data read in one call into one fresh buffer
    that the tensors view: file.readinto releases the GIL, so the window's thread reads while the
    step computes (safetensors' own reader holds it), and the buffer is freed with the last view."""
    with open(file, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{file} is truncated")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise ValueError(f"{file} is truncated (its header runs past the end)")
        header = json.loads(handle.read(header_len))
        data_len = size - 8 - header_len
        buffer = torch.empty(data_len, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        while done < data_len:
            got = handle.readinto(view[done:])
            if not got:
                raise ValueError(f"{file} is truncated")
            done += got
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        dtype, (start, end) = _DTYPES[entry["dtype"]], entry["data_offsets"]
        shape = entry["shape"]
        itemsize = torch.tensor([], dtype=dtype).element_size()
        count = 1
        for dim in shape:
            count *= dim
        if not 0 <= start <= end <= data_len or end - start != count * itemsize:
            raise ValueError(f"{file}: tensor {name} lies outside the file")
        raw = buffer[start:end]
        if start % itemsize:  # safetensors aligns its tensors; a copy where one is not
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
    return metadata, tensors


def read_layer(file: Path, key: str, index: int, device: torch.device) -> LayerWeights:
    """The layer written by write_layer, on `device`. Raises (OSError, ValueError, ...) where the
    file is missing, truncated, corrupt or written under another key."""
    meta, tensors = _read_safetensors(file)
    if meta.get("key") != key or meta.get("layer") != str(index) or META not in meta:
        raise ValueError(f"{file} is not layer {index} of this cache")
    if device.type != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    layer = _decode(json.loads(meta[META]), tensors)
    if not isinstance(layer, LayerWeights):
        raise ValueError(f"{file} does not hold a layer")
    return layer


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("layer-*.safetensors"))

class CachedLayers:
    """A window's reader: layer i from its cache file, else (missing, unreadable, written under
    another key) from `convert` (the checkpoint, finished), with a warning, written anew for next
    time. A cache that cannot be written (a read-only disk, a layer it cannot encode) is turned
    off with a warning: every read then converts, as without a cache."""

    def __init__(self, directory: Path, key: str, device: torch.device, convert):
        self.directory, self.key, self.device, self.convert = directory, key, device, convert
        self.enabled = True
        self._warned: set[int] = set()

    def cached(self, index: int) -> LayerWeights | None:
        """Layer `index` from its file where one is there and whole, else None (no warning)."""
        file = layer_file(self.directory, index)
        if not self.enabled or not file.exists():
            return None
        try:
            return read_layer(file, self.key, index, self.device)
        except Exception:  # noqa: BLE001 - rebuilt by the caller: any fault of the file is the same fault
            return None

    def fill(self, num_layers: int, built: dict[int, LayerWeights]) -> int:
        """Write every layer whose file is missing (`built`: layers already converted); the number written."""
        written = 0
        for index in range(num_layers):
            if not self.enabled:
                break
            if layer_file(self.directory, index).exists():
                continue
            layer = built.pop(index, None) or self.convert(index)
            self._write(index, layer)
            written += self.enabled
            del layer
        return written

    def _write(self, index: int, layer: LayerWeights) -> None:
        try:
            write_layer(layer_file(self.directory, index), layer, self.key, index)
        except (OSError, CacheUnsupported) as error:
            logger.warning("layer cache off (layers are read from the checkpoint and finished on every pass): "
                           "writing %s failed: %s", layer_file(self.directory, index), str(error))
            self.enabled = False

    def read(self, index: int) -> LayerWeights:
        if self.enabled:
            file = layer_file(self.directory, index)
            try:
                return read_layer(file, self.key, index, self.device)
            except Exception as error:  # noqa: BLE001 - missing, truncated, corrupt: rebuilt alike
                if index not in self._warned:
                    self._warned.add(index)
                    # The message as a string: a record holding the exception would hold this frame, whose
                    # `layer` the window then could never free.
                    logger.warning("layer cache: %s cannot be read (%s); layer %d is rebuilt from the "
                                   "checkpoint and written again", file, f"{type(error).__name__}: {error}", index)
        layer = self.convert(index)
        if self.enabled:
            self._write(index, layer)
        return layer
