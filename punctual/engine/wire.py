"""The wire between the front end and the engine core process: message types and framing.

A message is an 8-byte length and a pickle, over one local socket pair:

    front end -> core   a list of commands: ("add", EngineCoreRequest) | ("abort", [ids]) | ("shutdown", None)
                        | ("pin", (pin_id, token_ids, cache_salt)) | ("unpin", pin_id)
                        | ("load_lora", LoRARequest) | ("unload_lora", lora_int_id): answered by a PinAck
                        | KV moves between replicas, each answered by a KVAnswer with its op_id:
                          ("kv_export", (op_id, request_id, first_block, last_block, int8, transport))
                          ("kv_migrate_out", (op_id, request_id, first_block, int8, transport))
                          ("kv_reserve", (op_id, request_id, num_blocks))
                          ("kv_receive", (op_id, request_id, first_block, payload))
                          ("kv_commit", (op_id, MigratedRequest, first_block, payload | None))
                          ("kv_abort_import", (op_id, request_id))
                          ("kv_discard", (op_id, payload)): drop a payload a called-off move left
                        A payload is what the transport carries: pickled bytes (relay), a
                        SharedKV (direct) or a StagedKV (object-store).
    core -> front end   CoreInfo once, then a CoreUpdate per step (outputs, pin answers, stats
                        when they changed), or CoreFailure

Pure Python (no torch): the front end imports it.
"""
from __future__ import annotations

import asyncio
import pickle
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable

from punctual.engine.stats import EngineStats
from punctual.kv.block_pool import BlockHash
from punctual.request import EngineCoreOutput

# Bigger kernel buffers let the core write one step's outputs for a large batch without
# waiting for the front end to read; the kernel caps this at wmem_max.
SOCKET_BUFFER_BYTES = 4 << 20
FRAME_HEADER = struct.Struct("!Q")  # payload length in bytes; a pickle follows


@dataclass
class CoreInfo:
    """What the core reports once it has loaded the model: the limits the front end validates against."""

    pid: int
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_request_tokens: int  # the most tokens one request can hold in the KV pool
    stats: EngineStats


@dataclass
class PinAck:
    """The core's answer to a pin or an unpin: accepted, or refused with an HTTP status and why."""

    pin_id: str
    ok: bool
    status: int = 200
    error: str | None = None
    num_tokens: int = 0


@dataclass(frozen=True)
class SharedKV:
    """Direct: a KVPayload laid out in a shared-memory segment of the host both replicas share.
    The receiver maps it by name, copies it out and unlinks it."""

    name: str
    nbytes: int
    num_blocks: int
    int8: bool
    layout: tuple  # per tensor: (field, layer, dtype name, shape, byte offset)


@dataclass(frozen=True)
class StagedKV:
    """Object store: a KVPayload waiting in a replica's KVMailbox under `key`; the front end has Ray
    carry it from the source's outbox to the target's inbox (ObjectRefs only pass through it)."""

    key: str


@dataclass
class KVAnswer:
    """The core's answer to a kv_* command. `payload` is what the transport carries (bytes, a
    SharedKV or a StagedKV), so the front end passes it on without unpickling tensors (it never
    imports torch)."""

    op_id: int
    ok: bool
    error: str | None = None
    payload: bytes | SharedKV | StagedKV | None = None
    first_block: int = 0
    num_blocks: int = 0  # blocks in the payload
    state: object = None  # kv_migrate_out: the MigratedRequest
    seconds: float = 0.0  # time the core spent on it (reading and encoding, or decoding and queueing the KV)
    nbytes: int = 0  # the KV's size in the transport's encoding


@dataclass
class CoreUpdate:
    """One message per core step (or per batch of commands handled while idle)."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats | None = None  # None: unchanged since the last update that carried them
    # Requests the core refused in add_request, and why (the front end answers 400).
    rejected: dict[str, str] = field(default_factory=dict)
    pin_acks: list[PinAck] = field(default_factory=list)  # answers to pin and unpin commands, in order
    # Prefix-cache block hashes indexed / evicted during the step, when the core records them (a
    # replica of a cluster: its router learns where each prefix lives). Empty otherwise.
    blocks_stored: list[BlockHash] = field(default_factory=list)
    blocks_evicted: list[int] = field(default_factory=list)
    # Requests the engine lost and cannot resume (a cluster whose replica died), and why: the
    # front end ends them with an error. Never set by a core itself.
    lost: dict[str, str] = field(default_factory=dict)
    kv_answers: list[KVAnswer] = field(default_factory=list)  # answers to kv_* commands, in order


@dataclass
class CoreFailure:
    """The core crashed; its traceback, sent before the process exits."""

    reason: str


def encode_frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload)) + payload


class BlockingChannel:
    """Frames over a blocking socket: the core's end, and the front end's while the core starts."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(True)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def send(self, message: object) -> None:
        self.sock.sendall(encode_frame(message))

    def poll(self, timeout_s: float = 0.0) -> bool:
        """True when a message (or EOF) is waiting."""
        return bool(self._poller.poll(int(timeout_s * 1000)))

    def recv(self) -> object:
        (size,) = FRAME_HEADER.unpack(self._read_exactly(FRAME_HEADER.size))
        return pickle.loads(self._read_exactly(size))

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("the other end closed the channel")
            got += n
        return buffer


class FrameProtocol(asyncio.Protocol):
    """Frames over an asyncio transport: the front end's end once the core is running."""

    def __init__(self, on_message: Callable[[object], None], on_lost: Callable[[], None]):
        self.on_message = on_message
        self.on_lost = on_lost
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        header = FRAME_HEADER.size
        while len(self.buffer) >= header:
            (size,) = FRAME_HEADER.unpack_from(self.buffer)
            if len(self.buffer) < header + size:
                return
            payload = bytes(self.buffer[header:header + size])
            del self.buffer[:header + size]
            self.on_message(pickle.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()
