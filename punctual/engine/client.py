"""The front end's handle on an EngineCore running in its own process (see core_process.py).

The front end's end of the socket is an asyncio transport: reads wake the loop directly (no
reader thread waiting for the GIL behind the loop), and writes never block it, so a burst of
long prompts cannot stall the loop, nor deadlock against a core that is itself blocked writing a
large update. Imports no torch: the core process does. Every connection starts with the mutual
HMAC handshake of punctual/wire/auth.py (the local core gets a fresh secret with its process
arguments; a cluster's replicas share the cluster's), and frames are engine/messages.py's data.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from typing import Callable

from punctual.config import EngineConfig
from punctual.engine.messages import (SCHEMA, CoreFailure, CoreInfo, CoreUpdate, decode_from_core, encode_commands,
                                      front_end_channel)
from punctual.engine.stats import EngineStats
from punctual.engine.tasks import TaskFailures
from punctual.request import EngineCoreRequest
from punctual.wire.auth import authenticate_server, new_secret
from punctual.wire.channel import SOCKET_BUFFER_BYTES, BlockingChannel, FrameProtocol, encode_frame
from punctual.wire.codec import WireError

__all__ = ["CoreInfo", "CoreUpdate", "EngineCoreClient", "EngineDeadError"]


class EngineDeadError(RuntimeError):
    """The core process is gone; nothing sent to it will be answered."""


def _run_core(config: EngineConfig, sock: socket.socket, secret: bytes) -> None:
    """The spawned process's entry: imports the engine (and torch) there, not in the front end."""
    from punctual.engine.core_process import run_core_process

    run_core_process(config, sock, secret)


class EngineCoreClient:
    """Starts the core process (or connects to one already running elsewhere: a cluster replica),
    sends it commands, and hands its updates to the asyncio loop. Implements engine/protocol.py's
    EngineClient."""

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
        self.background_failures = TaskFailures()  # it runs no background task: stays empty

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return None if self.info is None else self.info.pid  # a remote core reports its own

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
        # The spawn pipe carries the arguments, so the secret is never in a process listing.
        secret = new_secret()
        self.process = context.Process(target=_run_core, args=(self.config, child_sock, secret),
                                       name="punctual-core", daemon=True)
        self.process.start()
        # Only the child may hold its end, or the front end would never see EOF when it dies.
        child_sock.close()
        self.sock = parent_sock
        channel = front_end_channel(parent_sock)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._wait_for_core(channel, deadline, timeout)  # its greeting: it has imported the engine
            authenticate_server(parent_sock, secret, SCHEMA.fingerprint, timeout_s=10.0)
            self._wait_for_core(channel, deadline, timeout)  # its CoreInfo: the model has loaded
            return self._handshake(channel)
        except (RuntimeError, WireError) as exc:
            self._stop_process(5.0)
            if isinstance(exc, WireError):
                raise RuntimeError(f"engine core: {exc}") from None
            raise

    def _wait_for_core(self, channel: BlockingChannel, deadline: float | None, timeout: float | None) -> None:
        while not channel.poll(0.1):
            if not self.process.is_alive():
                raise RuntimeError(f"engine core exited during start-up (exit code {self.process.exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                self._stop_process(0)
                raise RuntimeError(f"engine core did not start within {timeout} s")

    def connect(self, host: str, port: int, timeout: float | None = None, *, secret: bytes) -> CoreInfo:
        """Connect (blocking) to a core that listens on host:port, e.g. a cluster replica, prove
        that this end holds the cluster's `secret` (and check that the core does), and read its
        CoreInfo. Its death shows as EOF on the socket; nothing here owns its process."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one frame per step: send it now
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        # A dead process closes its socket at once; a lost node does not: keepalive probes notice
        # that within a few seconds.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        self.sock = sock
        channel = front_end_channel(sock)
        try:
            # A replica greets one front end at a time: wait as long as the caller allows.
            if not channel.poll(timeout if timeout is not None else 1e9):
                raise RuntimeError(f"engine core at {host}:{port} sent nothing within {timeout} s")
            authenticate_server(sock, secret, SCHEMA.fingerprint, timeout_s=10.0)
            if not channel.poll(timeout if timeout is not None else 1e9):
                raise RuntimeError(f"engine core at {host}:{port} sent no CoreInfo within {timeout} s")
            return self._handshake(channel)
        except (RuntimeError, WireError, OSError) as exc:
            sock.close()
            if isinstance(exc, RuntimeError):
                raise
            raise RuntimeError(f"engine core at {host}:{port}: {exc}") from None

    def _handshake(self, channel: BlockingChannel) -> CoreInfo:
        try:
            message = channel.recv()
        except EOFError:
            code = self.process.exitcode if self.process is not None else None
            raise RuntimeError(f"engine core exited during start-up (exit code {code})") from None
        if isinstance(message, CoreFailure):
            raise RuntimeError(f"engine core failed to start:\n{message.reason}")
        self.info = message
        self.stats = message.stats
        return message

    async def attach(self, on_update: Callable[[CoreUpdate], None], on_death: Callable[[str], None]) -> None:
        """Deliver updates (and the core's death) to callbacks on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._on_update, self._on_death = on_update, on_death
        protocol = lambda: FrameProtocol(decode_from_core, self._on_message, self._core_exited)  # noqa: E731
        if self.sock.family == socket.AF_UNIX:
            self._transport, _ = await self._loop.create_unix_connection(protocol, sock=self.sock)
        else:
            self._transport, _ = await self._loop.create_connection(protocol, sock=self.sock)
        if self.process is not None:
            # The socket closes when the core dies; the sentinel also catches a core that exits
            # while something it forked still holds the socket open.
            self._loop.add_reader(self.process.sentinel, self._core_exited)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(("add", request))

    def pin_prefix(self, pin_id: str, prompt_token_ids: list[int], cache_salt: str | None = None) -> None:
        self._send(("pin", (pin_id, list(prompt_token_ids), cache_salt)))

    def unpin_prefix(self, pin_id: str) -> None:
        self._send(("unpin", pin_id))

    def load_lora(self, lora_request) -> None:
        self._send(("load_lora", lora_request))

    def unload_lora(self, lora_int_id: int) -> None:
        self._send(("unload_lora", lora_int_id))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(("abort", list(request_ids)))

    def kv_command(self, kind: str, args: tuple) -> None:
        """A kv_* command (engine/messages.py); its KVAnswer comes back in a CoreUpdate."""
        self._send((kind, args))

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
            self._transport.write(encode_frame(encode_commands, commands))

    def _on_message(self, message: object) -> None:
        if isinstance(message, CoreUpdate):
            if message.stats is not None:
                self.stats = message.stats
            self._on_update(message)
        elif isinstance(message, CoreFailure):
            self._mark_dead(f"engine core crashed:\n{message.reason}")

    def _core_exited(self, error: str | None = None) -> None:
        if error is not None:  # a frame that did not decode: the connection is closed, the core is lost to us
            self._mark_dead(error)
            return
        if self.process is None:
            self._mark_dead(f"the connection to engine core {self.pid} closed (its process died)")
            return
        self._mark_dead(f"engine core process exited (exit code {self.process.exitcode})")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self._detach()
        if self._on_death is not None and not self._closing:
            self._on_death(reason)

    def _detach(self) -> None:
        if self.process is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.process.sentinel)
        if self._transport is not None:
            self._transport.abort()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to abort everything and exit; kill it if it has not within `timeout`.
        A remote core is only told: its owner (the cluster) stops its process."""
        if self.process is None and self.sock is None:
            return
        self._closing = True
        if self.dead_reason is None and self._transport is not None:
            self._outbox.append(("shutdown", None))
            self._flush()
        if self.process is not None:
            await asyncio.to_thread(self._stop_process, timeout)
        elif self._transport is not None:  # the core closes the connection once it has aborted everything
            deadline = time.monotonic() + timeout
            while self.dead_reason is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        else:
            self.sock.close()
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
