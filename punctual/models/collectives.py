"""The collectives a tensor-parallel decoder calls, over a gloo process group of its own, and
between ranks of one host through a shared-memory buffer.

A group object rather than torch.distributed's default group: an in-process engine (LLM(...),
the tests) may build and close several engines in one process, and the default group is a
process-wide global that can be set up once.

The all-reduces after each attention output and MLP (and the logits' gather) are small and
latency-bound; gloo sends each one through loopback TCP, a round of system calls and wake-ups
per message. Ranks on one host instead share one buffer (vLLM's CPU backend does the same): a
rank copies its tensor into its slot, raises its counter, spins until every counter reaches the
call, and reads the slots. Tensors larger than a slot go through gloo.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHM_SLOT_BYTES = 4 << 20  # per rank and per set of slots: a decode step's [tokens, hidden] fits many times
SHM_DIR = "/dev/shm"
_LINE = 64  # bytes: each counter on its own cache line (neighbours' writes would bounce one line)
# Spins (about a microsecond each) before each further check yields the core: a yield costs a system
# call where the core is free, and gives it to the late peer where ranks outnumber free cores.
_SPINS = 100
_CHECK_EVERY = 64  # yields between checks of the peers' health and the deadline


class CollectiveError(RuntimeError):
    """A peer died, stalled past the timeout or failed: the collective cannot complete."""


class SharedMemoryExchange:
    """Equal-shaped tensors exchanged among the `size` ranks of one host through one shared file
    (on /dev/shm): exchange(x) returns every rank's x, in rank order.

    Layout: a counter per rank (the number of its last exchange) and an abort flag, then two sets
    of `size` slots used alternately. A rank writes call k + 2's slot only after every rank has
    raised its counter to k + 1, which each does after it has read call k's slots: no slot is
    overwritten while a peer reads it. x86-64 only (RankGroup checks): its stores become visible
    to other cores in program order and its loads are not reordered with older loads, so a slot
    written before the counter is complete once the counter is seen."""

    def __init__(self, path: str, rank: int, size: int, slot_bytes: int, timeout_s: float,
                 peers_alive: Callable[[], bool] | None = None):
        self.rank, self.size, self.slot_bytes, self.timeout_s = rank, size, slot_bytes, timeout_s
        self.peers_alive = peers_alive
        self.control_bytes = (size + 1) * _LINE
        storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=shm_file_bytes(size, slot_bytes))
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        control = self.buffer[:self.control_bytes].numpy().view(np.int64)
        step = _LINE // 8
        self.counters = control[0:size * step:step]  # a view: each read sees the peers' writes
        self.abort_flag = control[size * step:size * step + 1]
        self.calls = 0

    def _slot(self, parity: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = self.control_bytes + (parity * self.size + rank) * self.slot_bytes
        nbytes = like.numel() * like.element_size()
        return self.buffer[start:start + nbytes].view(like.dtype).view(like.shape)

    def exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (each rank's tensor of the same shape and dtype), rank order: views of
        the shared slots, valid until this rank's next exchange but one."""
        if x.numel() * x.element_size() > self.slot_bytes:
            raise ValueError(f"{x.numel() * x.element_size()} bytes do not fit a {self.slot_bytes}-byte slot")
        if self.abort_flag[0]:
            raise CollectiveError(f"tensor-parallel rank {self.rank}: a peer failed (the shared-memory exchange "
                                  "was aborted)")
        self.calls += 1
        parity = self.calls & 1
        self._slot(parity, self.rank, x).copy_(x)
        self.counters[self.rank] = self.calls  # after the copy: the peers read the slot once they see it
        self._wait(self.calls)
        return [self._slot(parity, rank, x) for rank in range(self.size)]

    def _wait(self, call: int) -> None:
        """Until every rank's counter reaches `call`; CollectiveError if a peer failed, died or
        stalled past the timeout (then the abort flag tells the others at once)."""
        spins = 0
        started = None
        while self.counters.min() < call:
            spins += 1
            if spins < _SPINS:
                continue
            os.sched_yield()  # cores may be fewer than ranks: let the late peer run
            if spins % _CHECK_EVERY:
                continue
            started = started or time.monotonic()
            late = [rank for rank in range(self.size) if self.counters[rank] < call]
            if self.abort_flag[0]:
                raise CollectiveError(f"tensor-parallel rank {self.rank}: a peer failed (ranks {late} did not "
                                      "reach the shared-memory exchange)")
            if self.peers_alive is not None and not self.peers_alive():
                self.abort()
                raise CollectiveError(f"tensor-parallel rank {self.rank}: a peer died (ranks {late} did not "
                                      "reach the shared-memory exchange)")
            if time.monotonic() - started > self.timeout_s:
                self.abort()
                raise CollectiveError(f"tensor-parallel rank {self.rank}: ranks {late} did not reach the "
                                      f"shared-memory exchange in {self.timeout_s:g} s")

    def abort(self) -> None:
        """Make every rank's current and next exchange fail (this rank cannot go on)."""
        self.abort_flag[0] = 1


def shm_file_bytes(size: int, slot_bytes: int) -> int:
    return (size + 1) * _LINE + 2 * size * slot_bytes


def create_shm_file(size: int, slot_bytes: int) -> str:
    """A new file on /dev/shm, its pages allocated (a tmpfs that is full fails here with OSError,
    not later with SIGBUS on a page the exchange touches); its path."""
    path = os.path.join(SHM_DIR, f"punctual-tp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, shm_file_bytes(size, slot_bytes))
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


class RankGroup:
    """This process's rank in a group of `size` ranks that split one model.

    Every rank must call the same collectives in the same order (they run the same step plans
    through the same code); a peer that died makes the call raise (gloo sees the closed socket;
    the shared-memory exchange asks `peers_alive`, and sees another rank's abort) or time out
    after `timeout_s`, never hang for good."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout_s: float, all_reduce: str | None = "shm",
                 peers_alive: Callable[[], bool] | None = None, shm_slot_bytes: int = SHM_SLOT_BYTES,
                 host: str | None = None):
        """`all_reduce` (rank 0's choice; the other ranks pass None and follow it): "shm" for the
        shared-memory exchange where it can be set up, "gloo" for gloo alone. `peers_alive`: False
        once a peer process is known dead (a shared-memory wait then fails at once, rather than
        after `timeout_s`, which gloo does by itself when the peer's socket closes). `host`: the
        address gloo binds here, one the other ranks reach (ranks on several hosts); None: gloo's
        default (this host's name, or loopback)."""
        if rank == 0 and all_reduce not in ("shm", "gloo"):
            raise ValueError(f"all_reduce must be 'shm' or 'gloo', got {all_reduce!r}")
        self.rank = rank
        self.size = size
        prefixed = dist.PrefixStore("punctual-tp", store)
        if host is None:
            self.group = dist.ProcessGroupGloo(prefixed, rank, size, datetime.timedelta(seconds=timeout_s))
        else:  # the hostname may resolve to loopback, which the other hosts cannot reach
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            options._timeout = datetime.timedelta(seconds=timeout_s)
            self.group = dist.ProcessGroupGloo(prefixed, rank, size, options)
        self.shm = self._shared_memory(prefixed, all_reduce, shm_slot_bytes, timeout_s, peers_alive)
        self.all_reduce_kind = "gloo" if self.shm is None else "shm"
        # Seconds spent inside the collectives and their count, for the benchmark's share of step time.
        self.all_reduce_s = 0.0
        self.num_all_reduces = 0
        self.num_gloo_fallbacks = 0  # shared-memory group, tensor larger than a slot
        self.all_gather_s = 0.0

    def _shared_memory(self, store: dist.Store, all_reduce: str | None, slot_bytes: int, timeout_s: float,
                       peers_alive) -> SharedMemoryExchange | None:
        """The exchange every rank maps, or None (gloo alone) as rank 0 decides; rank 0 asks for
        it only when every rank runs on its host (runner/tensor_parallel.py)."""
        if self.size == 1:
            return None
        if self.rank == 0:
            path = ""
            if all_reduce == "shm" and platform.machine() not in ("x86_64", "AMD64"):
                logger.info("tensor parallel: gloo all-reduce (the shared-memory one relies on x86's store order)")
            elif all_reduce == "shm":
                try:
                    path = create_shm_file(self.size, slot_bytes)
                except OSError as exc:
                    logger.warning("tensor parallel: gloo all-reduce (no shared-memory buffer in %s: %s)",
                                   SHM_DIR, exc)
            store.set("shm", path)
        else:
            path = store.get("shm").decode()
        if not path:
            return None
        try:
            exchange = SharedMemoryExchange(path, self.rank, self.size, slot_bytes, timeout_s, peers_alive)
            self.group.allreduce([torch.zeros(1)]).wait()  # every rank has mapped the file
        finally:
            if self.rank == 0:  # the mappings keep it; nothing is left on /dev/shm however the ranks end
                os.unlink(path)
        return exchange

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks (a row-parallel linear's partial products), into x where it is
        contiguous (returned). Through shared memory the sum runs in rank order on every rank:
        the same bits everywhere, float32 or bfloat16."""
        started = time.perf_counter()
        # A contiguous buffer is what gloo sends and what the slot takes in one copy.
        buffer = x if x.is_contiguous() else x.contiguous()
        if self.shm is not None and buffer.numel() * buffer.element_size() <= self.shm.slot_bytes:
            parts = self.shm.exchange(buffer)
            buffer.copy_(parts[0])
            for part in parts[1:]:
                buffer.add_(part)
        else:
            self.num_gloo_fallbacks += self.shm is not None
            self.group.allreduce([buffer]).wait()
        self.all_reduce_s += time.perf_counter() - started
        self.num_all_reduces += 1
        return buffer

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] on each rank -> [rows, size * cols], rank order (the vocabulary's slices)."""
        started = time.perf_counter()
        x = x.contiguous()
        if self.shm is not None and x.numel() * x.element_size() <= self.shm.slot_bytes:
            gathered = torch.cat(self.shm.exchange(x), dim=-1)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            self.group.allgather([parts], [x]).wait()
            gathered = torch.cat(parts, dim=-1)
        self.all_gather_s += time.perf_counter() - started
        return gathered

    def min_int(self, value: int) -> int:
        """The smallest of each rank's `value` (what every rank can hold, e.g. KV blocks)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        self.group.allreduce([tensor], dist.ReduceOp.MIN).wait()
        return int(tensor.item())

    def timings(self) -> dict:
        return dict(all_reduce=self.all_reduce_kind, all_reduce_s=self.all_reduce_s,
                    num_all_reduces=self.num_all_reduces, num_gloo_fallbacks=self.num_gloo_fallbacks,
                    all_gather_s=self.all_gather_s)
