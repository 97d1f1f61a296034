"""Tensor-parallel ranks 1..N-1 as Ray actors, placed by Ray on whichever nodes have the CPUs
(tensor_parallel_backend "ray"; runner/tensor_parallel.py is rank 0 and the rank's loop).

Placement: one placement group, one bundle of threads_per_rank CPUs per rank, strategy PACK:
Ray puts the ranks on as few nodes as their CPUs allow, so they share a host's shared-memory
all-reduce where they can and cross hosts (gloo) only where one node lacks the CPUs. A replica of
a cluster runs in bundle 0 of its group's placement group, which the cluster's launcher made (and
removes; a restarted replica finds it again, its old ranks' bundles free); ranks 1..N-1 take
bundles 1..N-1. An engine outside such a group (LLM(..., tensor_parallel_backend="ray") after
ray.init) makes a group of N-1 bundles for its ranks and removes it on close. Ray only places the
processes: the rendezvous is rank 0's torch TCPStore on its node's address (Ray's own idea of it,
the one the other nodes reach) and a free port; the collectives are torch's gloo.

Plans: each rank connects to rank 0's listener on that address, answers its HMAC challenge with
the group's secret (made here, handed to the rank through Ray's actor arguments, never a command
line or the network), then says which rank it is; from then on frames of runner/rank_wire.py's
schema, never a pickle. A connection that fails the handshake is logged and closed.

Failure: a killed rank's connection closes; rank 0 sees it at once in its next collective or
send (RankFailure). The actors are owned by rank 0's process, so Ray ends them with it however it
ends; close() kills them and removes the placement group.
"""
from __future__ import annotations

import logging
import os
import socket
import time

import torch.distributed as dist

from punctual.runner.rank_wire import SCHEMA, RankReport, decode_command, decode_report, encode_command
from punctual.wire.auth import authenticate_client, authenticate_server, new_secret
from punctual.wire.channel import BlockingChannel
from punctual.wire.codec import WireError

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0  # Ray reserving the ranks' bundles (CPUs free somewhere in the cluster)
HANDSHAKE_TIMEOUT_S = 10.0  # a connected rank proving the secret and naming itself
CONNECT_TIMEOUT_S = 60.0  # a rank reaching rank 0's listener
# The names of the placement groups a cluster's launcher makes for its replicas (bundle 0: the replica).
GROUP_NAME_PREFIX = "punctual-tp-"


def replica_group(size: int):
    """The placement group this process (a replica's actor) was placed in by the cluster's launcher
    for its `size` ranks, or None."""
    import ray

    group = ray.util.get_current_placement_group()
    if group is None or group.bundle_count != size:
        return None
    name = ray.util.placement_group_table(group).get("name") or ""
    return group if name.startswith(GROUP_NAME_PREFIX) else None


def peer_closed(sock: socket.socket) -> bool:
    """The other end closed the connection (its process died): EOF waits to be read."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class RankActor:
    """A rank's process as a Ray actor (ray.remote wraps this plain class): run() is its life."""

    def run(self, run_rank, rank: int, size: int, rank0_host: str, store_port: int, plan_port: int, secret: bytes,
            model_config, cache_config, max_num_seqs: int, threads: int) -> None:
        """`run_rank`: the rank's life once connected (runner/tensor_parallel.py's, passed by reference)."""
        import ray

        logging.basicConfig(level=logging.WARNING,
                            format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
        sock = socket.create_connection((rank0_host, plan_port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            authenticate_server(sock, secret, SCHEMA.fingerprint, HANDSHAKE_TIMEOUT_S)
            end = _RankEnd(sock)
            end.send("hello", {"rank": rank, "pid": os.getpid()})
            host = ray.util.get_node_ip_address()
            run_rank(rank, size, store_port, model_config, cache_config, max_num_seqs, threads, end,
                     store_host=rank0_host, host=host, peers_alive=lambda: not peer_closed(sock),
                     started={"node_id": ray.get_runtime_context().get_node_id(), "host": host})
        finally:
            sock.close()  # rank 0 sees EOF: this rank is out of the group


class _RankEnd:
    """A Ray rank's end of its connection to rank 0: reports out, commands (plans) in."""

    def __init__(self, sock: socket.socket):
        self.channel = BlockingChannel(sock, SCHEMA.pack, decode_command)

    def send(self, kind: str, payload=None) -> None:
        self.channel.send(RankReport(kind, payload))

    def recv(self):
        try:
            return self.channel.recv()
        except WireError as exc:  # never run: the rank leaves the group, rank 0 sees it fail
            raise OSError(f"a malformed frame from rank 0: {exc}") from None


class RayRank:
    """Rank 0's end of a rank that runs as a Ray actor (LocalRank's surface)."""

    def __init__(self, rank: int, actor, run_ref, channel: BlockingChannel, pid: int, peer: str):
        self.rank, self.actor, self.run_ref, self.channel = rank, actor, run_ref, channel
        self.pid, self.peer = pid, peer

    encode = staticmethod(encode_command)

    def send_encoded(self, data: bytes) -> None:
        self.channel.send(data)

    def poll(self, timeout_s: float) -> bool:
        return self.channel.poll(timeout_s)

    def recv(self):
        try:
            return self.channel.recv()
        except WireError as exc:
            raise OSError(f"a malformed frame from tensor-parallel rank {self.rank}: {exc}") from None

    def alive(self) -> bool:
        return not peer_closed(self.channel.sock)

    def died(self) -> str:
        return f"tensor-parallel rank {self.rank} (Ray actor, pid {self.pid} on {self.peer}) died"

    def request_stop(self) -> None:
        try:
            self.channel.send(encode_command("stop"))
        except OSError:
            pass  # gone already

    def wait_or_kill(self, timeout_s: float) -> None:
        import ray

        try:
            ray.wait([self.run_ref], timeout=timeout_s)
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - Ray already shut down, or the actor gone: nothing left to end
            pass
        self.channel.sock.close()


def start_ray_ranks(size: int, threads: int, run_rank, rank_args: tuple, timeout_s: float):
    """Place ranks 1..size-1 (threads CPUs each) and wait until each has connected and named
    itself. `run_rank(rank, size, store_port, *rank_args, conn, ...)`: a rank's loop, and
    `rank_args` (model_config, cache_config, max_num_seqs, threads) its arguments. RuntimeError
    if a rank fails before it joined.
    Returns (the store, rank 0's address, the RayRanks in rank order, what releases them)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():
        raise ValueError("tensor_parallel_backend 'ray' needs this process connected to Ray: a replica of a "
                         "cluster started with --ray-address, or ray.init() before the engine")
    total = ray.cluster_resources().get("CPU", 0)
    group = replica_group(size)
    owned = group is None  # else the launcher's: bundle 0 is this replica's, and the launcher removes it
    if owned:
        need = threads * (size - 1)
        if need > total:
            raise ValueError(f"tensor parallel: ranks 1..{size - 1} need {size - 1} x {threads} = {need} Ray CPUs "
                             f"(threads_per_rank each), the Ray cluster has {total:g}")
        group = placement_group([{"CPU": threads}] * (size - 1), strategy="PACK")
    actors: list = []

    def release() -> None:
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - gone already, or Ray shut down
                pass
        if owned:
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001
                pass

    try:
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"tensor parallel: Ray could not place {size - 1} ranks of {threads} CPUs in {PLACEMENT_TIMEOUT_S:g} s "
                f"({ray.available_resources().get('CPU', 0):g} of {total:g} CPUs free)") from None
        host = ray.util.get_node_ip_address()
        store = dist.TCPStore(host, 0, size, True, wait_for_workers=False)
        secret = new_secret()
        actor_class = ray.remote(RankActor)
        with socket.create_server((host, 0)) as listener:
            refs = []
            for rank in range(1, size):
                strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank - owned)
                actors.append(actor_class.options(num_cpus=threads, max_restarts=0,
                                                  scheduling_strategy=strategy).remote())
                refs.append(actors[-1].run.remote(run_rank, rank, size, host, store.port, listener.getsockname()[1],
                                                  secret, *rank_args))
            ranks = _accept(listener, secret, actors, refs, timeout_s)
    except BaseException:
        release()
        raise
    logger.info("tensor parallel: ranks 1..%d placed by Ray (%s), rendezvous at %s:%d", size - 1,
                ", ".join(f"pid {r.pid} on {r.peer}" for r in ranks), host, store.port)
    return store, host, ranks, release


def _accept(listener: socket.socket, secret: bytes, actors: list, refs: list, timeout_s: float) -> list[RayRank]:
    """Every rank's authenticated connection, in rank order; RuntimeError if a rank failed first."""
    import ray

    deadline = time.monotonic() + timeout_s
    ranks: dict[int, RayRank] = {}
    listener.settimeout(0.2)
    while len(ranks) < len(refs):
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:  # a rank's life ended before it joined: say why
            rank = refs.index(ref) + 1
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the actor's error, as Ray reports it
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {exc}") from exc
            raise RuntimeError(f"tensor-parallel rank {rank} ended before it connected")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel ranks {sorted(set(range(1, len(refs) + 1)) - set(ranks))} did not "
                              f"connect to rank 0 in {timeout_s:g} s")
        try:
            sock, peer = listener.accept()
        except TimeoutError:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            authenticate_client(sock, secret, SCHEMA.fingerprint, HANDSHAKE_TIMEOUT_S)
            channel = BlockingChannel(sock, lambda data: data, decode_report)
            if not channel.poll(HANDSHAKE_TIMEOUT_S):
                raise WireError("no hello")
            kind, payload = channel.recv()
            rank = payload.get("rank") if kind == "hello" and isinstance(payload, dict) else None
            if not isinstance(rank, int) or not 1 <= rank <= len(refs) or rank in ranks:
                raise WireError(f"expected a hello naming a rank not yet connected, got {kind!r} {payload!r}")
        except (WireError, OSError, EOFError) as exc:
            logger.warning("tensor parallel: refused a connection from %s: %s", peer, exc)
            sock.close()
            continue
        ranks[rank] = RayRank(rank, actors[rank - 1], refs[rank - 1], channel, int(payload.get("pid", 0)), peer[0])
    return [ranks[rank] for rank in sorted(ranks)]
