"""The front end's handle on an EngineCore running in its own process.

The core runs a busy step loop in a child process (spawned, so CUDA works there), so HTTP,
tokenizing and detokenizing in the front end never stall a model step (vLLM v1's split). The
two sides talk over one local socket pair with pickled messages:

    front end -> core   a list of commands: ("add", EngineCoreRequest) | ("abort", [ids]) | ("shutdown", None)
    core -> front end   CoreInfo once, then a CoreUpdate per step (outputs + stats), or CoreFailure

The core drains every pending command before each step and blocks on the socket when it has
nothing to do. The front end reads updates from its asyncio loop (no threads: a reader thread
would wait for the GIL behind the loop, adding up to a switch interval to every token).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Callable

from punctual.config import EngineConfig
from punctual.engine.core import EngineCore, EngineStats
from punctual.request import EngineCoreOutput, EngineCoreRequest

# Bigger socket buffers let a burst of new prompts (or one step's outputs for a large batch)
# be written without the writer waiting for the reader; the kernel caps this at wmem_max.
SOCKET_BUFFER_BYTES = 4 << 20


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
    # When the core took each new request in (monotonic): the start of the engine's own TTFT.
    received: dict[str, float] = field(default_factory=dict)
    # Requests the core refused in add_request, and why (the front end answers 400).
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class CoreFailure:
    """The core crashed; its traceback, sent before the process exits."""

    reason: str


# ---- the core process ---------------------------------------------------------------------
def run_core_process(config: EngineConfig, conn: Connection) -> None:
    """Entry point of the core process: load the engine, then step until told to stop."""
    # Ctrl+C reaches the whole process group; the front end decides how to shut the core down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        core = EngineCore(config)
        conn.send(CoreInfo(os.getpid(), str(core.runner.model_path), core.max_model_len, core.vocab_size,
                           tuple(core.eos_token_ids), core.scheduler.max_request_tokens, core.stats()))
    except BaseException:
        conn.send(CoreFailure(traceback.format_exc()))
        return
    try:
        CoreLoop(core, conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front end is gone; nobody is left to answer
    except BaseException:
        try:
            conn.send(CoreFailure(traceback.format_exc()))
        finally:
            os._exit(1)


class CoreLoop:
    """Drain commands, step, report; block on the socket only when there is no work."""

    def __init__(self, core: EngineCore, conn: Connection):
        self.core = core
        self.conn = conn
        self.last_stats: EngineStats | None = None

    def run(self) -> None:
        while True:
            received: dict[str, float] = {}
            rejected: dict[str, str] = {}
            # Idle: wait for a command. Busy: take whatever arrived during the last step.
            if not self.core.has_unfinished_requests() or self.conn.poll():
                while True:
                    if not self.handle(self.conn.recv(), received, rejected):
                        return
                    if not self.conn.poll():
                        break
            outputs = self.core.step() if self.core.has_unfinished_requests() else []
            stats = self.core.stats()
            if outputs or received or rejected or stats != self.last_stats:
                self.conn.send(CoreUpdate(outputs, stats, received, rejected))
                self.last_stats = stats

    def handle(self, commands: list[tuple], received: dict[str, float], rejected: dict[str, str]) -> bool:
        """Apply one batch of commands; False when told to shut down."""
        now = time.monotonic()
        for kind, payload in commands:
            if kind == "add":
                try:
                    self.core.add_request(payload)
                    received[payload.request_id] = now
                except ValueError as exc:
                    rejected[payload.request_id] = str(exc)
            elif kind == "abort":
                self.core.abort_requests(payload)
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
        self.conn: Connection | None = None
        self.info: CoreInfo | None = None
        self.stats: EngineStats | None = None  # the latest the core reported
        self.dead_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_update: Callable[[CoreUpdate], None] | None = None
        self._on_death: Callable[[str], None] | None = None
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
        parent_conn, child_conn = context.Pipe(duplex=True)
        for conn in (parent_conn, child_conn):
            sock = socket.socket(fileno=os.dup(conn.fileno()))
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            sock.close()
        self.process = context.Process(target=run_core_process, args=(self.config, child_conn),
                                       name="punctual-core", daemon=True)
        self.process.start()
        # Only the child may hold its end, or the front end would never see EOF when it dies.
        child_conn.close()
        self.conn = parent_conn
        deadline = None if timeout is None else time.monotonic() + timeout
        while not parent_conn.poll(0.1):
            if not self.process.is_alive():
                raise RuntimeError(f"engine core exited during start-up (exit code {self.process.exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"engine core did not start within {timeout} s")
        message = parent_conn.recv()
        if isinstance(message, CoreFailure):
            self.shutdown()
            raise RuntimeError(f"engine core failed to start:\n{message.reason}")
        self.info = message
        self.stats = message.stats
        return message

    def attach(self, loop: asyncio.AbstractEventLoop, on_update: Callable[[CoreUpdate], None],
               on_death: Callable[[str], None]) -> None:
        """Deliver updates (and the core's death) to callbacks that run on `loop`."""
        self._loop, self._on_update, self._on_death = loop, on_update, on_death
        loop.add_reader(self.conn.fileno(), self._read_updates)
        loop.add_reader(self.process.sentinel, self._core_exited)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send([("add", request)])

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send([("abort", list(request_ids))])

    def _send(self, commands: list[tuple]) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        try:
            self.conn.send(commands)
        except OSError as exc:
            self._mark_dead(f"lost the engine core's socket: {exc}")
            raise EngineDeadError(self.dead_reason) from exc

    def _read_updates(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if isinstance(message, CoreUpdate):
                    self.stats = message.stats
                    self._on_update(message)
                elif isinstance(message, CoreFailure):
                    self._mark_dead(f"engine core crashed:\n{message.reason}")
                    return
        except (EOFError, OSError):
            self._core_exited()

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
            for fd in (self.conn.fileno(), self.process.sentinel):
                try:
                    self._loop.remove_reader(fd)
                except (ValueError, OSError):
                    pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to abort everything and exit; kill it if it does not within `timeout`."""
        if self.process is None:
            return
        self._closing = True
        if self.dead_reason is None and self.conn is not None:
            try:
                self.conn.send([("shutdown", None)])
            except OSError:
                pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        if self.dead_reason is None:
            self.dead_reason = "engine core was shut down"
            self._detach()
        if self.conn is not None:
            self.conn.close()
