"""Tensor parallelism on CPUs: one model split across N rank processes, on this host or placed by Ray.

Rank 0 is the engine core's runner (the scheduler and KV manager run once, beside it); ranks
1..N-1 are processes it starts, each holding its shard of the weights and of the KV cache
(models/sharding.py). Every step, rank 0 sends the step plan to each rank over a socket pair (one
pickle, written N-1 times: a star, which is what link latency favours at this size; TPI-LLM's
point), then every rank runs ModelRunner.execute on its shard, meeting at the all-reduces after
each attention output and MLP and at the gather of the vocabulary's logits (through a shared-memory
buffer, or gloo with PUNCTUAL_TP_ALL_REDUCE=gloo and for tensors larger than its slots); rank 0
samples. Everything rank 0's runner does with KV (copies to and from the second tier, writes)
travels inside the plan, so the ranks apply it too.

Plans go over those connections rather than a collective: a rank waits for the next plan as long
as the server idles, and the connection's end-of-file tells it at once that rank 0 is gone. The
collectives' timeout covers only a rank that stalls mid-step. A dead rank fails the step with RankFailure
(the core process reports it; the server answers 503); close() and the end of rank 0's process,
however it ends, leave no rank behind.

With tensor_parallel_backend "ray" (a replica of a cluster joined with --ray-address, or an engine
in a process connected to Ray) ranks 1..N-1 are Ray actors instead (runner/tp_ray.py): the plans
go over an authenticated TCP connection in the wire format (runner/rank_wire.py), the rendezvous
on rank 0's node address, and the all-reduce through shared memory only where every rank shares
rank 0's host.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from punctual.checkpoints.loader import resolve_model_path
from punctual.config import CacheConfig, LoRAConfig, ModelConfig
from punctual.models.collectives import RankGroup
from punctual.models.registry import load_arch_config
from punctual.models.sharding import check_tensor_parallel_size
from punctual.plan import ModelRunnerOutput, StepPlan
from punctual.runner.runner import ModelRunner

logger = logging.getLogger(__name__)

# A collective waits this long for a peer (a rank that stalls mid-step, or loads its shard more
# slowly at start-up) before the step fails; a dead peer fails it at once (gloo sees its socket close).
COLLECTIVE_TIMEOUT_S = 300.0
START_TIMEOUT_S = 600.0  # a rank's model load
STOP_TIMEOUT_S = 5.0
# "shm" (default): the all-reduces between the ranks go through shared memory; "gloo": through
# gloo's loopback TCP alone (to compare the two; models/collectives.py).
ALL_REDUCE_ENV = "PUNCTUAL_TP_ALL_REDUCE"


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or its collective failed: the group cannot step any more."""


def default_threads_per_rank(size: int) -> int:
    """This machine's cores (those this process may run on) shared among the ranks, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // size)


class TensorParallelRunner(ModelRunner):
    """Rank 0 of `model_config.tensor_parallel_size`: a ModelRunner over its shard that starts the
    other ranks and sends them every step's plan. The rest of the engine sees a ModelRunner."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, max_num_seqs: int,
                 shared_kv_bytes_per_block: int = 0, lora_config: LoRAConfig | None = None):
        size = model_config.tensor_parallel_size
        all_reduce = os.environ.get(ALL_REDUCE_ENV, "shm")
        if all_reduce not in ("shm", "gloo"):
            raise ValueError(f"{ALL_REDUCE_ENV} must be 'shm' or 'gloo', got {all_reduce!r}")
        # Refused before any process starts: the numbers that do not split, named.
        check_tensor_parallel_size(load_arch_config(resolve_model_path(model_config.model)), size)
        self.threads = model_config.threads_per_rank or default_threads_per_rank(size)
        self.ranks: list = []  # LocalRank or tp_ray.RayRank, ranks 1..N-1 in order
        self._closed = False
        self._threads_before = torch.get_num_threads()
        self._on_stop = None  # what else the ranks' end releases (Ray: their placement group)
        host = None  # the address gloo binds on this rank: None (loopback) for local ranks
        if model_config.tensor_parallel_backend == "ray":
            from punctual.runner.tp_ray import start_ray_ranks

            store, host, self.ranks, self._on_stop = start_ray_ranks(
                size, self.threads, run_rank, (model_config, cache_config, max_num_seqs, self.threads),
                START_TIMEOUT_S)
        else:
            # Rendezvous: rank 0 serves the store on a free loopback port and hands its number to the ranks.
            store = dist.TCPStore("127.0.0.1", 0, size, True, wait_for_workers=False)
            for rank in range(1, size):
                process, conn = _start_rank()
                self.ranks.append(LocalRank(rank, process, conn))
                conn.send_bytes(pickle.dumps((rank, size, store.port, model_config, cache_config, max_num_seqs,
                                              self.threads)))
        # However rank 0 ends (close(), the interpreter exiting, this object collected), the ranks go.
        self._finalizer = weakref.finalize(self, _stop_ranks, list(self.ranks), self._on_stop)
        try:
            torch.set_num_threads(self.threads)
            # Every rank started (a rank that fails to start is reported now, through its pipe,
            # rather than after the group's rendezvous times out).
            started = [self._expect(rank, "started") for rank in self.ranks]
            if host is not None and all_reduce == "shm":
                nodes = {payload["node_id"] for payload in started} | {_ray_node_id()}
                if len(nodes) > 1:  # shared memory joins one host's processes only
                    logger.info("tensor parallel: ranks on %d hosts: gloo all-reduce", len(nodes))
                    all_reduce = "gloo"
            # A rank that dies mid-step fails rank 0's shared-memory wait at once (gloo's sees the socket close).
            self.group = RankGroup(store, 0, size, COLLECTIVE_TIMEOUT_S, all_reduce,
                                   peers_alive=lambda: all(rank.alive() for rank in self.ranks), host=host)
            super().__init__(model_config, cache_config, max_num_seqs, shared_kv_bytes_per_block, lora_config,
                             tensor_parallel=self.group)
            for rank in self.ranks:
                self._expect(rank, "ready")
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d ranks (%s, pids %s), %d threads each, %s all-reduce; rank 0's shard: %d of %d "
                    "heads, %d KV heads", size, model_config.tensor_parallel_backend, [os.getpid()] + self.rank_pids,
                    self.threads,
                    self.group.all_reduce_kind, self.arch.num_heads, self.arch.num_heads * size,
                    self.arch.num_kv_heads)

    @property
    def rank_pids(self) -> list[int]:
        """The process ids of ranks 1..N-1."""
        return [rank.pid for rank in self.ranks]

    def _expect(self, rank, kind: str):
        """The rank's next message, which must be `kind`; RankFailure if it died or failed."""
        if not rank.poll(COLLECTIVE_TIMEOUT_S if kind == "stats" else START_TIMEOUT_S):
            raise RankFailure(f"tensor-parallel rank {rank.rank} did not answer ({kind}) in time")
        try:
            got, payload = rank.recv()
        except (EOFError, OSError) as exc:
            raise RankFailure(rank.died()) from exc
        if got == "error":
            raise RankFailure(f"tensor-parallel rank {rank.rank} failed:\n{payload}")
        if got != kind:
            raise RankFailure(f"tensor-parallel rank {rank.rank} answered {got!r}, expected {kind!r}")
        return payload

    def _send(self, message: tuple) -> None:
        if self._closed:
            raise RankFailure("the tensor-parallel group is closed (a rank failed, or the engine shut down)")
        data = self.ranks[0].encode(*message) if self.ranks else b""  # encoded once, sent N - 1 times
        for rank in self.ranks:
            try:
                rank.send_encoded(data)
            except OSError as exc:  # a broken pipe: the rank is gone
                self.close()
                raise RankFailure(rank.died()) from exc

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ModelRunnerOutput:
        """Send the plan to every rank, then run rank 0's shard of it (and sample)."""
        self._send(("execute", _for_ranks(plan)))
        try:
            return super().execute(plan)
        except RuntimeError as exc:  # a collective failed: a peer died or stalled past the timeout
            dead = [rank.died() for rank in self.ranks if not rank.alive()]
            self.close()
            raise RankFailure("; ".join(dead) or f"a tensor-parallel collective failed: {exc}") from exc

    def rank_stats(self) -> list[dict]:
        """Per rank (0 first): time in the collectives and peak resident memory (for benchmarks)."""
        self._send(("stats", None))
        return [_own_stats(self.group)] + [self._expect(rank, "stats") for rank in self.ranks]

    def close(self) -> None:
        """Stop the other ranks and wait for them to exit (killed if they do not). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        torch.set_num_threads(self._threads_before)


def _stop_ranks(ranks: list, on_stop=None) -> None:
    for rank in ranks:
        rank.request_stop()
    for rank in ranks:
        rank.wait_or_kill(STOP_TIMEOUT_S)
    if on_stop is not None:
        on_stop()


class LocalRank:
    """Rank 0's end of a rank process it started on this host: a socket pair to its own child, so
    pickle here reads only what that child (this program) wrote."""

    def __init__(self, rank: int, process: subprocess.Popen, conn: Connection):
        self.rank, self.process, self.conn = rank, process, conn

    @property
    def pid(self) -> int:
        return self.process.pid

    @staticmethod
    def encode(kind: str, payload=None) -> bytes:
        return pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)

    def send_encoded(self, data: bytes) -> None:
        self.conn.send_bytes(data)

    def poll(self, timeout_s: float) -> bool:
        return self.conn.poll(timeout_s)

    def recv(self) -> tuple[str, object]:
        return pickle.loads(self.conn.recv_bytes())

    def alive(self) -> bool:
        return self.process.poll() is None

    def died(self) -> str:
        try:
            code = self.process.wait(0.5)
        except subprocess.TimeoutExpired:
            code = None
        return f"tensor-parallel rank {self.rank} (pid {self.process.pid}) died (exit code {code})"

    def request_stop(self) -> None:
        try:
            self.conn.send_bytes(self.encode("stop"))
        except OSError:
            pass  # gone already

    def wait_or_kill(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)
        self.conn.close()


def _start_rank() -> tuple[subprocess.Popen, Connection]:
    """A fresh interpreter running rank_main, and a connection to it over a socket pair.

    A plain subprocess, not multiprocessing's: the engine core runs in a daemonic process, which
    multiprocessing forbids to have children (it could not clean them up); these ranks clean up
    after themselves (_die_with_parent, and the end of file on this connection)."""
    ours, theirs = socket.socketpair()
    # The ranks import the same package as this process, wherever it lies (punctual/runner/ here).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from punctual.runner.tensor_parallel import rank_main; "
                               "rank_main(int(sys.argv[1]))", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
    theirs.close()  # the rank's end lives in the rank only: its death ends this connection
    return process, Connection(ours.detach())


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _for_ranks(plan: StepPlan) -> StepPlan:
    """The plan as the other ranks take it: the data their shard's step reads, without the
    scheduler's live Requests (preempted, rejected) or grammar matchers (only rank 0 samples, and
    a compiled matcher is not data to send)."""
    scheduled = plan.scheduled
    if any(item.new is not None and item.new.grammar is not None for item in scheduled):
        scheduled = [item if item.new is None or item.new.grammar is None
                     else dataclasses.replace(item, new=dataclasses.replace(item.new, grammar=None))
                     for item in scheduled]
    return dataclasses.replace(plan, scheduled=scheduled, preempted=[], rejected=[])


def _own_stats(group: RankGroup) -> dict:
    # ru_maxrss is in KiB on Linux.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(rank=group.rank, pid=os.getpid(), peak_rss_bytes=peak_rss, rss_bytes=resident_bytes(),
                **group.timings())


def resident_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (rank 0) dies, even mid-collective."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the pipe's end-of-file is the signal


def rank_main(fd: int) -> None:
    """Entry point of a local rank process (>= 1): its arguments come first on the connection `fd`."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # rank 0 died before the signal was armed
        return
    conn = Connection(fd)
    try:
        args = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank {args[0]} %(levelname)s %(name)s: %(message)s")
    # A peer's death reaches this rank through rank 0 (the exchange's abort flag, or this
    # process's death with its parent's).
    run_rank(*args, _PipeEnd(conn), peers_alive=lambda: os.getppid() == parent)


class _PipeEnd:
    """A local rank's end of its socket pair to rank 0 (pickle: both ends are this program)."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def send(self, kind: str, payload=None) -> None:
        self.conn.send_bytes(pickle.dumps((kind, payload)))

    def recv(self) -> tuple[str, object]:
        return pickle.loads(self.conn.recv_bytes())


def run_rank(rank: int, size: int, store_port: int, model_config: ModelConfig, cache_config: CacheConfig,
             max_num_seqs: int, threads: int, conn, *, store_host: str = "127.0.0.1", host: str | None = None,
             peers_alive=None, started: dict | None = None) -> None:
    """Rank `rank` (>= 1): load the shard, then run each plan rank 0 sends until told to stop or
    rank 0 is gone. `conn`: its link to rank 0 (send(kind, payload), recv()); `store_host`: where
    rank 0's store listens; `host`: the address gloo binds here (None: gloo's default); `peers_alive`:
    False once rank 0 is known gone; `started`: what the "started" report tells rank 0 (Ray: the node)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the group; rank 0 decides
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore(store_host, store_port, size, False)
        conn.send("started", started)
        # Rank 0 chooses the all-reduce.
        group = RankGroup(store, rank, size, COLLECTIVE_TIMEOUT_S, None, peers_alive=peers_alive, host=host)
        runner = ModelRunner(model_config, cache_config, max_num_seqs, tensor_parallel=group)
    except BaseException:
        conn.send("error", traceback.format_exc())
        return
    conn.send("ready")
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return  # rank 0 is gone
        if kind == "stop":
            return
        if kind == "stats":
            conn.send("stats", _own_stats(group))
            continue
        try:
            runner.execute(payload)
        except Exception:  # noqa: BLE001 - a peer's failure or our own: rank 0 sees the collective fail
            logger.error("tensor-parallel rank %d: step failed:\n%s", rank, traceback.format_exc())
            return
