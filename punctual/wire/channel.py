"""Frames over a socket: an 8-byte length, then one message of a Schema (codec.py).

Two ends: BlockingChannel for a thread that owns its socket (the engine core, a replica, the front
end while a core starts) and FrameProtocol for the front end's asyncio loop. Each is built with
the encoder of what it sends and the decoder of what it receives, so the same socket cannot be
read as the wrong kind of message. A frame that does not decode raises WireError (blocking) or
ends the connection with the error (asyncio); the peer authenticated first (auth.py), so a bad
frame is a bug or a version mismatch, never something to run.
"""
from __future__ import annotations

import asyncio
import select
import socket
import struct
from typing import Callable

from punctual.wire.codec import WireError

# Bigger kernel buffers let the core write one step's outputs for a large batch without
# waiting for the front end to read; the kernel caps this at wmem_max.
SOCKET_BUFFER_BYTES = 4 << 20
FRAME_HEADER = struct.Struct("!Q")  # payload length in bytes; a msgpack message follows
# A frame's largest size: a relayed KV payload of a long request is large, but a length beyond
# this is a corrupt header, not a message to allocate for.
MAX_FRAME_BYTES = 1 << 36

Encoder = Callable[[object], bytes]
Decoder = Callable[[bytes], object]


def encode_frame(encode: Encoder, message: object) -> bytes:
    payload = encode(message)
    return FRAME_HEADER.pack(len(payload)) + payload


def _frame_size(header: bytes | bytearray) -> int:
    (size,) = FRAME_HEADER.unpack_from(header)
    if size > MAX_FRAME_BYTES:
        raise WireError(f"a frame of {size} bytes is beyond the limit of {MAX_FRAME_BYTES}")
    return size


class BlockingChannel:
    """Frames over a blocking socket."""

    def __init__(self, sock: socket.socket, encode: Encoder, decode: Decoder):
        self.sock = sock
        self.encode, self.decode = encode, decode
        sock.setblocking(True)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def send(self, message: object) -> None:
        self.sock.sendall(encode_frame(self.encode, message))

    def poll(self, timeout_s: float = 0.0) -> bool:
        """True when a message (or EOF) is waiting."""
        return bool(self._poller.poll(int(timeout_s * 1000)))

    def recv(self) -> object:
        size = _frame_size(self._read_exactly(FRAME_HEADER.size))
        return self.decode(self._read_exactly(size))

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
    """Frames over an asyncio transport: the front end's end once the core is running. A frame
    that does not decode closes the connection; `on_lost` gets the reason (None: plain EOF)."""

    def __init__(self, decode: Decoder, on_message: Callable[[object], None],
                 on_lost: Callable[[str | None], None]):
        self.decode = decode
        self.on_message = on_message
        self.on_lost = on_lost
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.buffer += data
        header = FRAME_HEADER.size
        try:
            while len(self.buffer) >= header:
                size = _frame_size(self.buffer)
                if len(self.buffer) < header + size:
                    return
                payload = bytes(self.buffer[header:header + size])
                del self.buffer[:header + size]
                message = self.decode(payload)
                self.on_message(message)
        except WireError as exc:
            self.error = f"a malformed frame from the engine core: {exc}"
            self.buffer.clear()
            if self.transport is not None:
                self.transport.abort()  # connection_lost follows, with the reason

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self.error)
