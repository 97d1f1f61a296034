"""KV blocks as they travel between engines: every layer's K and V for a run of a request's blocks.

Read between steps from the source's pool and written into blocks the target allocated in
advance, through a KV copy order of the target's next step plan, so a transfer never races a
model step. Three transports carry them (KVMailbox): raw buffers relayed by the front end inside
the frames (an InlineKV), Ray's object store (only an ObjectRef passes the front end), or a
shared-memory segment between two replicas of one host (only its name passes). Every buffer
declares each tensor's dtype, shape and offset (punctual/wire/kv.py), checked before it is read. On the wire the blocks are in the cache's own dtype, or int8 with a float32 scale
per token and head (CacheGen's point: fewer bytes in flight; the quantizer of
`--kv-cache-dtype int8`, so a pool that is already int8 travels verbatim).
"""
from __future__ import annotations

import itertools
import mmap
import os
import warnings
from dataclasses import dataclass

import torch

from punctual.config import TRANSPORTS
from punctual.wire.codec import WireError
from punctual.wire.kv import (ALIGN, RELAY_SCHEMA, TENSOR_FIELDS, InlineKV, SharedKV, StagedKV, check_layout,
                              check_segment_name, tensor_nbytes)
from punctual.models.attention import LayerKVCache, quantize_int8


@dataclass
class KVPayload:
    num_blocks: int
    int8: bool
    k: list[torch.Tensor]  # per layer [num_blocks, block_size, kv_heads, head_dim], on the CPU
    v: list[torch.Tensor]
    k_scale: list[torch.Tensor] | None = None  # per layer [num_blocks, block_size, kv_heads] (int8 only)
    v_scale: list[torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        tensors = self.k + self.v + (self.k_scale or []) + (self.v_scale or [])
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def read_blocks(caches: list[LayerKVCache], block_ids: list[int], int8: bool) -> KVPayload:
    device = caches[0].k.device
    blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
    int8 = int8 or caches[0].quantized
    payload = KVPayload(len(block_ids), int8, [], [], [] if int8 else None, [] if int8 else None)
    for cache in caches:
        for name in ("k", "v"):
            values = getattr(cache, name).index_select(0, blocks)
            if int8:
                if cache.quantized:
                    scales = getattr(cache, f"{name}_scale").index_select(0, blocks)
                else:
                    shape = values.shape
                    q, scales = quantize_int8(values.view(-1, shape[2], shape[3]))
                    values, scales = q.view(shape), scales.view(shape[:3])
                getattr(payload, f"{name}_scale").append(scales.cpu())
            getattr(payload, name).append(values.cpu())
    return payload


@torch.inference_mode()
def write_blocks(caches: list[LayerKVCache], block_ids: list[int], payload: KVPayload) -> None:
    if len(block_ids) != payload.num_blocks:
        raise ValueError(f"a payload of {payload.num_blocks} KV blocks cannot fill {len(block_ids)}")
    if len(payload.k) != len(caches):
        raise ValueError(f"a payload of {len(payload.k)} layers cannot fill a model of {len(caches)}")
    device = caches[0].k.device
    blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
    for layer, cache in enumerate(caches):
        for name in ("k", "v"):
            values = getattr(payload, name)[layer]
            if payload.int8:
                scales = getattr(payload, f"{name}_scale")[layer]
                if cache.quantized:
                    getattr(cache, f"{name}_scale").index_copy_(0, blocks, scales.to(device))
                else:
                    values = (values.float() * scales.unsqueeze(-1)).to(cache.dtype)
            elif cache.quantized:
                shape = values.shape
                q, scales = quantize_int8(values.view(-1, shape[2], shape[3]))
                getattr(cache, f"{name}_scale").index_copy_(0, blocks, scales.view(shape[:3]).to(device))
                values = q.view(shape)
            getattr(cache, name).index_copy_(0, blocks, values.to(device=device, dtype=getattr(cache, name).dtype))


# ---- the transports (wire/kv.py names them; cluster/client.py picks one per move) -------------
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (multiprocessing.shared_memory's segments)


def _tensors(payload: KVPayload) -> list[tuple[str, int, torch.Tensor]]:
    """(field, layer, tensor) for every tensor of the payload, in a fixed order."""
    return [(name, layer, t) for name in TENSOR_FIELDS for layer, t in enumerate(getattr(payload, name) or [])]


def _assemble(num_blocks: int, int8: bool, tensors: list[tuple[str, int, torch.Tensor]]) -> KVPayload:
    """A payload from tensors a peer declared: each field's layers in order, every tensor
    num_blocks deep, scales with int8 only (WireError otherwise, before the pool is touched)."""
    payload = KVPayload(num_blocks, int8, [], [], [] if int8 else None, [] if int8 else None)
    for name, layer, tensor in tensors:
        into = getattr(payload, name)
        if into is None or layer != len(into) or tensor.dim() < 1 or tensor.shape[0] != num_blocks:
            raise WireError(f"KV payload: {name} of layer {layer} (shape {tuple(tensor.shape)}) does not "
                            f"fit a payload of {num_blocks} blocks, int8={int8}")
        into.append(tensor)
    if len(payload.v) != len(payload.k) or (int8 and not len(payload.k_scale) == len(payload.v_scale) == len(payload.k)):
        raise WireError("KV payload: its tensors do not cover the same layers")
    return payload


def _layout(payload: KVPayload) -> tuple[tuple, int]:
    """Each tensor's (field, layer, dtype, shape, offset) in one buffer, and the buffer's size."""
    layout, offset = [], 0
    for name, layer, t in _tensors(payload):
        layout.append((name, layer, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += (t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN  # aligned: every dtype view is legal
    return tuple(layout), offset


def _fill(flat: torch.Tensor, payload: KVPayload, layout: tuple) -> None:
    for (_, _, _, _, start), (_, _, t) in zip(layout, _tensors(payload)):
        flat[start:start + t.numel() * t.element_size()].copy_(t.contiguous().view(-1).view(torch.uint8))


def _unflatten(flat: torch.Tensor | None, num_blocks: int, int8: bool, layout: tuple) -> KVPayload:
    """Views of `flat` (uint8, already checked to hold every tensor of `layout`) as the payload."""
    tensors = []
    for name, layer, dtype, shape, start in layout:
        nbytes = tensor_nbytes(dtype, shape)
        data = flat[start:start + nbytes] if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors.append((name, layer, data.view(getattr(torch, dtype)).view(shape)))
    return _assemble(num_blocks, int8, tensors)


def to_inline(payload: KVPayload) -> bytes:
    """Relay: the payload's tensors as one raw buffer with their layout, encoded as an InlineKV."""
    layout, nbytes = _layout(payload)
    buffer = bytearray(nbytes)
    if nbytes:
        _fill(torch.frombuffer(buffer, dtype=torch.uint8), payload, layout)
    return RELAY_SCHEMA.pack(InlineKV(payload.num_blocks, payload.int8, layout, buffer))


def from_inline(data: bytes) -> KVPayload:
    inline = RELAY_SCHEMA.unpack(data, InlineKV)
    check_layout(inline.layout, len(inline.data))
    flat = None
    if inline.data:
        with warnings.catch_warnings():  # a read-only view of the frame: only read (copied into the pool)
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(inline.data, dtype=torch.uint8)
    return _unflatten(flat, inline.num_blocks, inline.int8, inline.layout)


def to_shared(payload: KVPayload) -> SharedKV:
    """Direct: copy the payload into a new shared-memory segment of this host (one copy); the
    receiver maps it by name and unlinks it."""
    from multiprocessing import shared_memory

    layout, nbytes = _layout(payload)
    segment = _untracked(shared_memory.SharedMemory(create=True, size=max(nbytes, 1)))
    try:
        flat = torch.frombuffer(segment.buf, dtype=torch.uint8)
        _fill(flat, payload, layout)
        del flat
    finally:
        segment.close()
    return SharedKV(segment.name, nbytes, payload.num_blocks, payload.int8, layout)


def from_shared(handle: SharedKV) -> KVPayload:
    """Map the segment and unlink its name at once: the payload's tensors read the mapping itself
    (no copy here; the write into the pool at the next step is the only one), and the memory goes
    when they do. POSIX shared memory is a file of /dev/shm on Linux."""
    check_segment_name(handle.name)
    check_layout(handle.layout, handle.nbytes)
    path = os.path.join(SHM_DIR, handle.name)
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < handle.nbytes:
            raise WireError(f"shared-memory segment {handle.name} is smaller than its declared {handle.nbytes} bytes")
        mapping = mmap.mmap(fd, max(handle.nbytes, 1))
    finally:
        os.close(fd)
        os.unlink(path)
    data = torch.frombuffer(mapping, dtype=torch.uint8, count=handle.nbytes) if handle.nbytes else None
    return _unflatten(data, handle.num_blocks, handle.int8, handle.layout)


def discard_shared(handle: SharedKV) -> None:
    """Unlink a segment nobody will read (the move was called off); already gone is fine."""
    check_segment_name(handle.name)
    try:
        os.unlink(os.path.join(SHM_DIR, handle.name))
    except FileNotFoundError:
        pass


def _untracked(segment):
    """Python's resource tracker would unlink a segment when the process that made it exits (and
    warn): the receiver owns it and unlinks it."""
    from multiprocessing import resource_tracker

    resource_tracker.unregister(segment._name, "shared_memory")
    return segment


def to_arrays(payload: KVPayload) -> dict:
    """Object store: numpy arrays (Ray stores and maps them without a copy on this host); bfloat16,
    which numpy lacks, travels as its bits in int16."""
    arrays = []
    for name, layer, t in _tensors(payload):
        dtype = str(t.dtype).removeprefix("torch.")
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        arrays.append((name, layer, dtype, bits.numpy()))
    return {"num_blocks": payload.num_blocks, "int8": payload.int8, "arrays": arrays}


def from_arrays(message: dict) -> KVPayload:
    tensors = []
    with warnings.catch_warnings():  # Ray's arrays are read-only views of the store: only read here
        warnings.simplefilter("ignore", UserWarning)
        for name, layer, dtype, array in message["arrays"]:
            t = torch.from_numpy(array)
            tensors.append((name, layer, t.view(torch.bfloat16) if dtype == "bfloat16" else t))
    return _assemble(message["num_blocks"], message["int8"], tensors)


class KVMailbox:
    """A replica's end of every transport: the KV it sends is encoded for the transport the front
    end asked for; what it receives is decoded whichever way it came. Object-store payloads wait
    here until Ray takes them (outbox) or until the core's next kv_receive or kv_commit (inbox);
    the replica actor's Ray methods touch only these two dicts, never the core."""

    def __init__(self):
        self.outbox: dict[str, dict] = {}
        self.inbox: dict[str, dict] = {}
        self._keys = itertools.count()

    def send(self, payload: KVPayload, transport: str) -> bytes | SharedKV | StagedKV:
        if transport == "relay":
            return to_inline(payload)
        if transport == "direct":
            return to_shared(payload)
        if transport == "object-store":
            key = f"{os.getpid()}:{next(self._keys)}"
            self.outbox[key] = to_arrays(payload)
            return StagedKV(key)
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")

    def receive(self, handle: bytes | SharedKV | StagedKV) -> KVPayload:
        if isinstance(handle, SharedKV):
            return from_shared(handle)
        if isinstance(handle, StagedKV):
            message = self.inbox.pop(handle.key, None)
            if message is None:
                raise ValueError(f"no KV staged under {handle.key!r}")
            return from_arrays(message)
        if isinstance(handle, bytes):
            return from_inline(handle)
        raise WireError(f"not a KV payload: {type(handle).__name__}")

    def discard(self, handle: bytes | SharedKV | StagedKV) -> None:
        """Drop what a called-off move left here (safe to call on either side, more than once)."""
        if isinstance(handle, SharedKV):
            discard_shared(handle)
        elif isinstance(handle, StagedKV):
            self.outbox.pop(handle.key, None)
            self.inbox.pop(handle.key, None)

    def clear(self) -> None:
        self.outbox.clear()
        self.inbox.clear()
