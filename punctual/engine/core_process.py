"""The engine core's process: load the engine, then drain commands, step and report until told to stop.

The core runs a busy step loop in a child process (spawned, so CUDA works there), so HTTP,
tokenizing and detokenizing in the front end never stall a model step (vLLM v1's split). It
drains every pending command before each step and blocks on the socket when it has nothing to do.
The socket speaks punctual/wire: the front end proves it holds the secret it gave this process
before any frame is read, and frames are data of engine/messages.py's schema.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback

from punctual.config import EngineConfig
from punctual.engine.core import EngineCore
from punctual.engine.messages import SCHEMA, CoreFailure, CoreInfo, CoreUpdate, KVAnswer, PinAck, core_channel
from punctual.engine.stats import EngineStats
from punctual.runner.kv_transfer import KVMailbox
from punctual.wire.auth import authenticate_client
from punctual.wire.channel import BlockingChannel
from punctual.wire.codec import WireError

logger = logging.getLogger(__name__)

SLOW_SEND_S = 0.5  # the socket was full that long: the front end is not keeping up
# Stats ride along with a step's outputs at most this often (and always when the core goes idle):
# the front end reads them for /metrics, not per token.
STATS_INTERVAL_S = 0.1


def core_info(core: EngineCore) -> CoreInfo:
    """What a front end learns once about the core it talks to (its limits, its process)."""
    return CoreInfo(os.getpid(), str(core.runner.model_path), core.max_model_len, core.vocab_size,
                     tuple(core.eos_token_ids), core.scheduler.max_request_tokens, core.stats(),
                     core.scheduler.streaming)


def run_core_process(config: EngineConfig, sock: socket.socket, secret: bytes) -> None:
    """Entry point of the core process: authenticate the front end, load the engine, then step
    until told to stop. `secret` came with the process's arguments (a pipe, not argv)."""
    # Ctrl+C reaches the whole process group; the front end decides how to shut the core down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        authenticate_client(sock, secret, SCHEMA.fingerprint)
    except (WireError, OSError) as exc:
        logger.error("engine core: closing the front end's connection: %s", exc)
        return
    channel = core_channel(sock)
    try:
        core = EngineCore(config)
        core.background_adapter_loads = True  # a cold adapter's read never stalls the step loop
        channel.send(core_info(core))
    except BaseException:
        channel.send(CoreFailure(traceback.format_exc()))
        return
    try:
        CoreLoop(core, channel, config.check_integrity).run()
        core.close()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front end is gone; nobody is left to answer
    except WireError as exc:  # never executed: the connection (this core's only one) ends here
        logger.error("engine core: a malformed frame from the front end, closing: %s", exc)
    except BaseException:
        try:
            channel.send(CoreFailure(traceback.format_exc()))
        finally:
            os._exit(1)


class CoreLoop:
    """Drain commands, step, report; block on the socket only when there is no work."""

    def __init__(self, core: EngineCore, channel: BlockingChannel, check_integrity: bool = False,
                 mailbox: KVMailbox | None = None):
        self.core = core
        self.mailbox = mailbox if mailbox is not None else KVMailbox()  # KV moving in and out
        self.channel = channel
        self.check_integrity = check_integrity
        self.last_stats: EngineStats | None = None
        self.last_stats_time = 0.0
        # `punctual sim calibrate --server`: the serving loop's own step times (off unless asked).
        self.trace = None
        if os.environ.get("PUNCTUAL_STEP_TRACE"):
            from punctual.engine.trace import StepTrace

            self.trace = StepTrace.from_env(core.scheduler)

    def run(self) -> None:
        try:
            self._run()
        finally:
            if self.trace is not None:
                self.trace.close()

    def _run(self) -> None:
        while True:
            rejected: dict[str, str] = {}
            acks: list[PinAck] = []
            self.kv_answers: list[KVAnswer] = []
            idle = not self.core.has_unfinished_requests()
            # Idle: wait for a command. Busy: take whatever arrived during the last step.
            if idle or self.channel.poll():
                if self.check_integrity and not self.core.has_unfinished_requests():
                    self.core.check_integrity()  # a failure crashes the core: the front end reports it
                while True:
                    if not self.handle(self.channel.recv(), rejected, acks):
                        return
                    if not self.channel.poll():
                        break
                if self.kv_answers and self.core.has_unfinished_requests():
                    # A move waits on each answer: send them now, not after the step (a step
                    # more of stall per copy round otherwise).
                    self.channel.send(CoreUpdate([], kv_answers=self.kv_answers))
                    self.kv_answers = []
            outputs = self.core.step() if self.core.has_unfinished_requests() else []
            if self.core.rejections:  # a grammar or an adapter that failed after intake: a 400 in the front end
                rejected.update(self.core.rejections)
                self.core.rejections.clear()
            if self.core.lora_acks:  # load commands whose background read ended
                acks.extend(self.core.lora_acks)
                self.core.lora_acks.clear()
            stats = self._stats_to_send()
            stored, evicted = self.core.kv_manager.pool.take_events()
            kv_answers = self.kv_answers
            if outputs or rejected or acks or stats is not None or stored or evicted or kv_answers:
                started = time.monotonic()
                self.channel.send(CoreUpdate(outputs, stats, rejected, acks, stored, evicted, kv_answers=kv_answers))
                if time.monotonic() - started > SLOW_SEND_S:
                    logger.warning("the front end took %.2f s to take a step's outputs", time.monotonic() - started)
            if self.trace is not None:
                self.trace.stepped(idle, outputs)
                if not self.core.has_unfinished_requests():
                    self.trace.flush()  # idle now: written before the server can be stopped

    def _stats_to_send(self) -> EngineStats | None:
        """The stats, when they changed and either the core is idle or the last were sent a while ago."""
        now = time.monotonic()
        if self.core.has_unfinished_requests() and now - self.last_stats_time < STATS_INTERVAL_S:
            return None
        stats = self.core.stats()
        if stats == self.last_stats:
            return None
        self.last_stats, self.last_stats_time = stats, now
        return stats

    def handle(self, commands: list[tuple], rejected: dict[str, str], acks: list[PinAck]) -> bool:
        """Apply one batch of commands; False when told to shut down."""
        for kind, payload in commands:
            if kind == "add":
                if self.trace is not None:
                    self.trace.added(payload.request_id, payload.arrival_time, len(payload.prompt_token_ids),
                                     payload.sampling_params.max_tokens)
                try:
                    self.core.add_request(payload)
                except ValueError as exc:
                    rejected[payload.request_id] = str(exc)
            elif kind == "abort":
                self.core.abort_requests(payload)
            elif kind == "pin":
                acks.append(self.core.pin_prefix(*payload))
            elif kind == "unpin":
                acks.append(self.core.unpin_prefix(payload))
            elif kind == "load_lora":
                ack = self.core.load_lora(payload)  # None: read in the background, answered when done
                if ack is not None:
                    acks.append(ack)
            elif kind == "unload_lora":
                acks.append(self.core.unload_lora(payload))
            elif kind.startswith("kv_"):
                self.kv_answers.append(self.handle_kv(kind, payload))
            elif kind == "shutdown":
                self.core.abort_requests(list(self.core.scheduler.requests))
                return False
            else:
                raise ValueError(f"unknown command {kind!r}")
        return True

    def handle_kv(self, kind: str, args: tuple) -> KVAnswer:
        """One KV transfer command, between steps (this thread is the only one that touches the
        core). A refusal is an answer, not a crash: the other side calls the migration off."""
        op_id, *args = args
        started = time.perf_counter()
        try:
            if kind == "kv_export":
                request_id, first_block, last_block, int8, transport = args
                kv = self.core.export_kv(request_id, first_block, last_block, int8)
                answer = KVAnswer(op_id, True, payload=self.mailbox.send(kv, transport),
                                  first_block=first_block, num_blocks=kv.num_blocks, nbytes=kv.nbytes)
            elif kind == "kv_migrate_out":
                request_id, first_block, int8, transport = args
                state, kv = self.core.migrate_out(request_id, first_block, int8)
                answer = KVAnswer(op_id, True, payload=self.mailbox.send(kv, transport),
                                  first_block=first_block, num_blocks=kv.num_blocks, state=state, nbytes=kv.nbytes)
            elif kind == "kv_reserve":
                answer = KVAnswer(op_id, self.core.reserve_import(*args))
            elif kind == "kv_receive":
                request_id, first_block, payload = args
                self.core.receive_kv(request_id, first_block, self.mailbox.receive(payload))
                answer = KVAnswer(op_id, True)
            elif kind == "kv_commit":
                state, first_block, payload = args
                kv = self.mailbox.receive(payload) if payload is not None else None
                answer = KVAnswer(op_id, self.core.commit_import(state, first_block, kv))
            elif kind == "kv_abort_import":
                self.core.abort_import(*args)
                answer = KVAnswer(op_id, True)
            elif kind == "kv_discard":
                self.mailbox.discard(*args)
                answer = KVAnswer(op_id, True)
            else:
                raise ValueError(f"unknown command {kind!r}")
        except ValueError as exc:
            return KVAnswer(op_id, False, str(exc))
        answer.seconds = time.perf_counter() - started
        return answer
