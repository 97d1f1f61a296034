"""The front end's handle on an EngineCore running in its own process.

The core runs a busy step loop in a child process (spawned, so CUDA works there), so HTTP,
tokenizing and detokenizing in the front end never stall a model step (vLLM v1's split). The
two sides talk over one local socket pair; a message is an 8-byte length and a pickle:

    front end -> core   a list of commands: ("add", EngineCoreRequest) | ("abort", [ids]) | ("shutdown", None)
                        | ("pin", (pin_id, token_ids)) | ("unpin", pin_id)
    core -> front end   CoreInfo once, then a CoreUpdate per step (outputs + stats), or CoreFailure

The core drains every pending command before each step and blocks on the socket when it has
nothing to do. The front end's end of the socket is an asyncio transport: reads wake the loop
directly (no reader thread waiting for the GIL behind the loop), and writes never block it,
so a burst of long prompts cannot stall the loop, nor deadlock against a core that is itself
blocked writing a large update.
"""
from __future__ import annotations

import logging

import asyncio
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from punctual.config import EngineConfig
from punctual.engine.core import EngineCore, EngineStats
from punctual.request import EngineCoreOutput, EngineCoreRequest

# Bigger kernel buffers let the core write one step's outputs for a large batch without
# waiting for the front end to read; the kernel caps this at wmem_max.
SOCKET_BUFFER_BYTES = 4 << 20
FRAME_HEADER = struct.Struct("!Q")  # payload length in bytes; a pickle follows

logger = logging.getLogger(__name__)

SLOW_SEND_S = 0.5  # the socket was full that long: the front end is not keeping up


class EngineDeadError(RuntimeError):
    """The core process is gone; nothing sent to it will be answered."""


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
class CoreUpdate:
    """One message per core step (or per batch of commands handled while idle)."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    # Requests the core refused in add_request, and why (the front end answers 400).
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class CoreFailure:
    """The core crashed; its traceback, sent before the process exits."""

    reason: str


# ---- the wire -----------------------------------------------------------------------------
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


# ---- the core process ---------------------------------------------------------------------
def run_core_process(config: EngineConfig, sock: socket.socket) -> None:
    """Entry point of the core process: load the engine, then step until told to stop."""
    # Ctrl+C reaches the whole process group; the front end decides how to shut the core down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = BlockingChannel(sock)
    try:
        core = EngineCore(config)
        channel.send(CoreInfo(os.getpid(), str(core.runner.model_path), core.max_model_len, core.vocab_size,
                              tuple(core.eos_token_ids), core.scheduler.max_request_tokens, core.stats()))
    except BaseException:
        channel.send(CoreFailure(traceback.format_exc()))
        return
    try:
        CoreLoop(core, channel).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front end is gone; nobody is left to answer
    except BaseException:
        try:
            channel.send(CoreFailure(traceback.format_exc()))
        finally:
            os._exit(1)


class CoreLoop:
    """Drain commands, step, report; block on the socket only when there is no work."""

    def __init__(self, core: EngineCore, channel: BlockingChannel):
        self.core = core
        self.channel = channel
        self.last_stats: EngineStats | None = None

    def run(self) -> None:
        while True:
            rejected: dict[str, str] = {}
            # Idle: wait for a command. Busy: take whatever arrived during the last step.
            if not self.core.has_unfinished_requests() or self.channel.poll():
                while True:
                    if not self.handle(self.channel.recv(), rejected):
                        return
                    if not self.channel.poll():
                        break
            outputs = self.core.step() if self.core.has_unfinished_requests() else []
            if self.core.grammar_rejections:  # structured output whose grammar failed: a 400 in the front end
                rejected.update(self.core.grammar_rejections)
                self.core.grammar_rejections.clear()
            stats = self.core.stats()
            if outputs or rejected or stats != self.last_stats:
                started = time.monotonic()
                self.channel.send(CoreUpdate(outputs, stats, rejected))
                if time.monotonic() - started > SLOW_SEND_S:
                    logger.warning("the front end took %.2f s to take a step's outputs", time.monotonic() - started)
                self.last_stats = stats

    def handle(self, commands: list[tuple], rejected: dict[str, str]) -> bool:
        """Apply one batch of commands; False when told to shut down."""
        for kind, payload in commands:
            if kind == "add":
                try:
                    self.core.add_request(payload)
                except ValueError as exc:
                    rejected[payload.request_id] = str(exc)
            elif kind == "abort":
                self.core.abort_requests(payload)
            elif kind == "pin":
                try:
                    self.core.pin_prefix(*payload)
                except ValueError as exc:
                    logger.warning("pin %s refused: %s", payload[0], exc)
            elif kind == "unpin":
                self.core.unpin_prefix(payload)
            elif kind == "shutdown":
                self.core.abort_requests(list(self.core.scheduler.requests))
                return False
            else:
                raise ValueError(f"unknown command {kind!r}")
        return True


# ---- the front end's side -----------------------------------------------------------------
class EngineCoreClient:
    """Starts the core process, sends it commands, and hands its updates to the asyncio loop."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.process: multiprocessing.process.BaseProcess | None = None
        self.sock: socket.socket | None = None
        self.info: CoreInfo | None = None
        self.stats: EngineStats | None = None  # the latest the core reported
        self.dead_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._on_update: Callable[[CoreUpdate], None] | None = None
        self._on_death: Callable[[str], None] | None = None
        self._outbox: list[tuple] = []
        self._closing = False

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def is_alive(self) -> bool:
        return self.info is not None and self.dead_reason is None

    def start(self, timeout: float | None = None) -> CoreInfo:
        """Spawn the core and wait (blocking) until its model is loaded; raises if it fails to start."""
        context = multiprocessing.get_context("spawn")
        parent_sock, child_sock = socket.socketpair()
        for sock in (parent_sock, child_sock):
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        self.process = context.Process(target=run_core_process, args=(self.config, child_sock),
                                       name="punctual-core", daemon=True)
        self.process.start()
        # Only the child may hold its end, or the front end would never see EOF when it dies.
        child_sock.close()
        self.sock = parent_sock
        channel = BlockingChannel(parent_sock)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not channel.poll(0.1):
            if not self.process.is_alive():
                raise RuntimeError(f"engine core exited during start-up (exit code {self.process.exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                self._stop_process(0)
                raise RuntimeError(f"engine core did not start within {timeout} s")
        try:
            message = channel.recv()
        except EOFError:
            self._stop_process(5.0)
            raise RuntimeError(f"engine core exited during start-up (exit code {self.process.exitcode})") from None
        if isinstance(message, CoreFailure):
            self._stop_process(5.0)
            raise RuntimeError(f"engine core failed to start:\n{message.reason}")
        self.info = message
        self.stats = message.stats
        return message

    async def attach(self, on_update: Callable[[CoreUpdate], None], on_death: Callable[[str], None]) -> None:
        """Deliver updates (and the core's death) to callbacks on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._on_update, self._on_death = on_update, on_death
        self._transport, _ = await self._loop.create_unix_connection(
            lambda: FrameProtocol(self._on_message, self._core_exited), sock=self.sock)
        # The socket closes when the core dies; the sentinel also catches a core that exits while
        # something it forked still holds the socket open.
        self._loop.add_reader(self.process.sentinel, self._core_exited)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(("add", request))

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int]) -> None:
        self._send(("pin", (pin_id, list(prompt_token_ids))))

    def unpin_prefix(self, pin_id: str) -> None:
        self._send(("unpin", pin_id))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(("abort", list(request_ids)))

    def _send(self, command: tuple) -> None:
        """Queue a command; everything queued in one loop iteration goes to the core as one message."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(command)

    def _flush(self) -> None:
        commands, self._outbox = self._outbox, []
        if commands and self.dead_reason is None:
            self._transport.write(encode_frame(commands))

    def _on_message(self, message: object) -> None:
        if isinstance(message, CoreUpdate):
            self.stats = message.stats
            self._on_update(message)
        elif isinstance(message, CoreFailure):
            self._mark_dead(f"engine core crashed:\n{message.reason}")

    def _core_exited(self) -> None:
        code = self.process.exitcode if self.process is not None else None
        self._mark_dead(f"engine core process exited (exit code {code})")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self._detach()
        if self._on_death is not None and not self._closing:
            self._on_death(reason)

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.process.sentinel)
        if self._transport is not None:
            self._transport.abort()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to abort everything and exit; kill it if it has not within `timeout`."""
        if self.process is None:
            return
        self._closing = True
        if self.dead_reason is None and self._transport is not None:
            self._outbox.append(("shutdown", None))
            self._flush()
        await asyncio.to_thread(self._stop_process, timeout)
        if self.dead_reason is None:
            self.dead_reason = "engine core was shut down"
            self._detach()

    def _stop_process(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        if self._transport is None and self.sock is not None:
            self.sock.close()
