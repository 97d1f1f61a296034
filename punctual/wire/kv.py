"""How moved KV blocks are named on the wire: the handles the transports pass around, and the
raw-buffer layout their tensors are declared in (dtype and shape, never a pickle).

Torch-free: the front end passes these on without touching tensors; punctual/runner/kv_transfer.py
builds and reads the buffers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from punctual.wire.codec import Schema, WireError

TENSOR_FIELDS = ("k", "v", "k_scale", "v_scale")
# The dtypes a KV buffer may declare (the cache's own, or int8 with float32 scales), and their sizes.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
ALIGN = 64  # every tensor starts on a 64-byte boundary, so every dtype view is legal
# POSIX shared-memory names as multiprocessing makes them: a bare name in /dev/shm, no path.
SEGMENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")

# One tensor of a payload: (field, layer, dtype name, shape, byte offset into the buffer).
TensorLayout = tuple[str, int, str, tuple[int, ...], int]


@dataclass(frozen=True)
class SharedKV:
    """Direct: a KVPayload laid out in a shared-memory segment of the host both replicas share.
    The receiver maps it by name, copies it out and unlinks it."""

    name: str
    nbytes: int
    num_blocks: int
    int8: bool
    layout: tuple[TensorLayout, ...]


@dataclass(frozen=True)
class StagedKV:
    """Object store: a KVPayload waiting in a replica's KVMailbox under `key`; the front end has Ray
    carry it from the source's outbox to the target's inbox (ObjectRefs only pass through it)."""

    key: str


@dataclass(frozen=True)
class InlineKV:
    """Relay: a KVPayload's tensors in one buffer that travels inside the frames (source -> front
    end -> target); the front end handles it as opaque bytes (KVMailbox encodes it)."""

    num_blocks: int
    int8: bool
    layout: tuple[TensorLayout, ...]
    data: bytes


RELAY_SCHEMA = Schema("punctual.kv.relay", [InlineKV])


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_BYTES[dtype]


def check_layout(layout: tuple[TensorLayout, ...], nbytes: int, num_layers: int | None = None) -> None:
    """Every tensor a known field and dtype, a non-negative shape, inside the buffer: raises
    WireError otherwise (a handle from a peer is checked before a byte of it is read)."""
    for name, layer, dtype, shape, offset in layout:
        if name not in TENSOR_FIELDS:
            raise WireError(f"KV layout: unknown tensor {name!r}")
        if dtype not in DTYPE_BYTES:
            raise WireError(f"KV layout: dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        if layer < 0 or (num_layers is not None and layer >= num_layers) or offset < 0 or offset % ALIGN:
            raise WireError(f"KV layout: bad layer {layer} or offset {offset} for {name}")
        if any(dim < 0 for dim in shape):
            raise WireError(f"KV layout: negative shape {shape} for {name}")
        if offset + tensor_nbytes(dtype, shape) > nbytes:
            raise WireError(f"KV layout: {name} of layer {layer} ends past the buffer's {nbytes} bytes")


def check_segment_name(name: str) -> None:
    if not SEGMENT_NAME.fullmatch(name) or name in (".", ".."):
        raise WireError(f"not a shared-memory segment name: {name!r}")
