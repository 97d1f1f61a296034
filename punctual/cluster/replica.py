"""One replica of a cluster: an EngineCore in a Ray actor's process, served over TCP.

The replica speaks the same framed protocol as a local core process (engine/messages.py over
punctual/wire): it listens on loopback when the cluster is this machine, on its node's address
otherwise, and serves one front end at a time, in a thread so the actor's own methods (address,
pid) still answer. Each connection must first prove it holds the cluster's secret (given to the
actor's constructor through Ray) within HANDSHAKE_TIMEOUT_S; then it gets a CoreInfo and the
CoreLoop. A connection that fails the handshake or sends a frame that is not a message of the
schema is logged and closed, and the replica goes on to the next one. The front end connects with
EngineCoreClient.connect. When the process dies, the kernel closes the socket and the front end
sees EOF at once; Ray restarts the actor (max_restarts), which loads the model again.

Ray is imported by the launcher (cluster/launch.py), not here: this class is plain Python and
Ray wraps it with ray.remote.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import traceback

from punctual.config import EngineConfig
from punctual.engine.messages import SCHEMA, CoreFailure, core_channel
from punctual.runner.kv_transfer import KVMailbox
from punctual.wire.auth import authenticate_client
from punctual.wire.channel import SOCKET_BUFFER_BYTES
from punctual.wire.codec import WireError

logger = logging.getLogger(__name__)


class ReplicaServer:
    """Loads the engine (in the actor's constructor, so a restart reloads it) and serves it."""

    def __init__(self, config: EngineConfig, num_threads: int, host: str | None, secret: bytes):
        """`host`: where to listen; None: this node's address as Ray knows it (a multi-node cluster).
        `secret`: the cluster's, which every connection must prove it holds."""
        import torch

        from punctual.engine.core import EngineCore

        torch.set_num_threads(num_threads)  # Ray reserved num_cpus for us; more threads would fight
        self.config = config
        self.core = EngineCore(config)
        self.core.kv_manager.pool.record_events = True  # the router learns where prefixes live
        self.mailbox = KVMailbox()  # KV moving in and out; Ray's methods below reach only this
        self._secret = secret
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self.listener = socket.create_server((host, 0))
        self.host = host
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, name="punctual-replica", daemon=True).start()

    def address(self) -> tuple[str, int, int]:
        """(host, port, pid): where to connect, and the process that holds the engine."""
        return self.host, self.port, os.getpid()

    def take_kv(self, key: str) -> dict:
        """Object-store transport, source side: the staged KV, as Ray's return value (its numpy
        arrays go into the object store; the front end gets only the ObjectRef)."""
        message = self.mailbox.outbox.pop(key, None)
        if message is None:
            raise KeyError(f"no KV staged under {key!r}")
        return message

    def stage_kv(self, key: str, message: dict) -> None:
        """Object-store transport, target side: Ray resolved the ObjectRef into `message` (arrays
        mapped from the store on this host); the next kv_receive or kv_commit takes it."""
        self.mailbox.inbox[key] = message

    def _serve(self) -> None:
        from punctual.engine.core_process import CoreLoop, core_info

        core = self.core
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return  # the listener was closed (an in-process replica shut down)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
                # Bounded: a peer that says nothing holds this loop (the only accept slot) 1 s at most.
                authenticate_client(conn, self._secret, SCHEMA.fingerprint)
            except (WireError, OSError) as exc:
                logger.warning("replica %d: refused a connection from %s: %s", os.getpid(), peer, exc)
                conn.close()
                continue
            channel = core_channel(conn)
            try:
                channel.send(core_info(core))
                CoreLoop(core, channel, self.config.check_integrity, self.mailbox).run()
            except (EOFError, BrokenPipeError, ConnectionResetError):
                pass  # the front end went away; the next one starts clean
            except WireError as exc:  # never executed: the connection ends, the replica serves on
                logger.warning("replica %d: closed the connection from %s on a malformed frame: %s",
                               os.getpid(), peer, exc)
            except BaseException:
                try:
                    channel.send(CoreFailure(traceback.format_exc()))
                finally:
                    os._exit(1)  # a broken core must not serve again: Ray restarts the process
            finally:
                conn.close()
            # Whatever the last front end left running belongs to nobody now.
            core.abort_requests(list(core.scheduler.requests))
            core.kv_manager.pool.take_events()
            self.mailbox.clear()
