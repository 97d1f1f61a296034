"""Tensor parallelism on CPUs: one model split across N rank processes on this host.

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
import traceback
import weakref
from dataclasses import dataclass
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


@dataclass
class _Rank:
    rank: int
    process: subprocess.Popen
    conn: Connection


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
        self.ranks: list[_Rank] = []
        self._closed = False
        self._threads_before = torch.get_num_threads()
        # Rendezvous: rank 0 serves the store on a free loopback port and hands its number to the ranks.
        store = dist.TCPStore("127.0.0.1", 0, size, True, wait_for_workers=False)
        for rank in range(1, size):
            process, conn = _start_rank()
            self.ranks.append(_Rank(rank, process, conn))
            conn.send_bytes(pickle.dumps((rank, size, store.port, model_config, cache_config, max_num_seqs,
                                          self.threads)))
        # However rank 0 ends (close(), the interpreter exiting, this object collected), the ranks go.
        self._finalizer = weakref.finalize(self, _stop_ranks, list(self.ranks))
        try:
            torch.set_num_threads(self.threads)
            # Every rank started (a rank that fails to start is reported now, through its pipe,
            # rather than after the group's rendezvous times out).
            for rank in self.ranks:
                self._expect(rank, "started")
            # A rank that dies mid-step fails rank 0's shared-memory wait at once (gloo's sees the socket close).
            self.group = RankGroup(store, 0, size, COLLECTIVE_TIMEOUT_S, all_reduce,
                                   peers_alive=lambda: all(rank.process.poll() is None for rank in self.ranks))
            super().__init__(model_config, cache_config, max_num_seqs, shared_kv_bytes_per_block, lora_config,
                             tensor_parallel=self.group)
            for rank in self.ranks:
                self._expect(rank, "ready")
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d ranks (pids %s), %d threads each, %s all-reduce; rank 0's shard: %d of %d "
                    "heads, %d KV heads", size, [os.getpid()] + self.rank_pids, self.threads,
                    self.group.all_reduce_kind, self.arch.num_heads, self.arch.num_heads * size,
                    self.arch.num_kv_heads)

    @property
    def rank_pids(self) -> list[int]:
        """The process ids of ranks 1..N-1."""
        return [rank.process.pid for rank in self.ranks]

    def _expect(self, rank: _Rank, kind: str):
        """The rank's next message, which must be `kind`; RankFailure if it died or failed."""
        if not rank.conn.poll(COLLECTIVE_TIMEOUT_S if kind == "stats" else START_TIMEOUT_S):
            raise RankFailure(f"tensor-parallel rank {rank.rank} did not answer ({kind}) in time")
        try:
            got, payload = pickle.loads(rank.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise RankFailure(self._died(rank)) from exc
        if got == "error":
            raise RankFailure(f"tensor-parallel rank {rank.rank} failed:\n{payload}")
        if got != kind:
            raise RankFailure(f"tensor-parallel rank {rank.rank} answered {got!r}, expected {kind!r}")
        return payload

    @staticmethod
    def _died(rank: _Rank) -> str:
        try:
            code = rank.process.wait(0.5)
        except subprocess.TimeoutExpired:
            code = None
        return f"tensor-parallel rank {rank.rank} (pid {rank.process.pid}) died (exit code {code})"

    def _send(self, message: tuple) -> None:
        if self._closed:
            raise RankFailure("the tensor-parallel group is closed (a rank failed, or the engine shut down)")
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank in self.ranks:
            try:
                rank.conn.send_bytes(data)
            except OSError as exc:  # a broken pipe: the rank is gone
                self.close()
                raise RankFailure(self._died(rank)) from exc

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ModelRunnerOutput:
        """Send the plan to every rank, then run rank 0's shard of it (and sample)."""
        self._send(("execute", _for_ranks(plan)))
        try:
            return super().execute(plan)
        except RuntimeError as exc:  # a collective failed: a peer died or stalled past the timeout
            dead = [self._died(rank) for rank in self.ranks if rank.process.poll() is not None]
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


def _stop_ranks(ranks: list[_Rank]) -> None:
    for rank in ranks:
        try:
            rank.conn.send_bytes(pickle.dumps(("stop", None)))
        except OSError:
            pass  # gone already
    for rank in ranks:
        try:
            rank.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rank.process.kill()
            rank.process.wait(STOP_TIMEOUT_S)
        rank.conn.close()


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
    """Entry point of a rank process (>= 1): its arguments come first on the connection `fd`."""
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
    run_rank(*args, conn)


def run_rank(rank: int, size: int, store_port: int, model_config: ModelConfig, cache_config: CacheConfig,
             max_num_seqs: int, threads: int, conn: Connection) -> None:
    """Rank `rank` (>= 1): load the shard, then run each plan rank 0 sends until told to stop or
    rank 0 is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the group; rank 0 decides
    torch.set_num_threads(threads)
    parent = os.getppid()
    try:
        store = dist.TCPStore("127.0.0.1", store_port, size, False)
        conn.send_bytes(pickle.dumps(("started", None)))
        # Rank 0 chooses the all-reduce; a peer's death reaches this rank through rank 0 (the
        # exchange's abort flag, or this process's death with its parent's).
        group = RankGroup(store, rank, size, COLLECTIVE_TIMEOUT_S, None, peers_alive=lambda: os.getppid() == parent)
        runner = ModelRunner(model_config, cache_config, max_num_seqs, tensor_parallel=group)
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            kind, payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # rank 0 is gone
        if kind == "stop":
            return
        if kind == "stats":
            conn.send_bytes(pickle.dumps(("stats", _own_stats(group))))
            continue
        try:
            runner.execute(payload)
        except Exception:  # noqa: BLE001 - a peer's failure or our own: rank 0 sees the collective fail
            logger.error("tensor-parallel rank %d: step failed:\n%s", rank, traceback.format_exc())
            return
