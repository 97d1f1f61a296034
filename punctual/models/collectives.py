"""The collectives a tensor-parallel decoder calls, over a gloo process group of its own.

A group object rather than torch.distributed's default group: an in-process engine (LLM(...),
the tests) may build and close several engines in one process, and the default group is a
process-wide global that can be set up once.
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist


class RankGroup:
    """This process's rank in a group of `size` ranks that split one model.

    Every rank must call the same collectives in the same order (they run the same step plans
    through the same code); a peer that died makes the call raise (gloo sees the closed socket)
    or time out after `timeout_s`, never hang for good."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout_s: float):
        self.rank = rank
        self.size = size
        prefixed = dist.PrefixStore("punctual-tp", store)
        self.group = dist.ProcessGroupGloo(prefixed, rank, size, datetime.timedelta(seconds=timeout_s))
        # Seconds spent inside the collectives and their count, for the benchmark's share of step time.
        self.all_reduce_s = 0.0
        self.num_all_reduces = 0
        self.all_gather_s = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (a row-parallel linear's partial products)."""
        started = time.perf_counter()
        # gloo reduces float32 and bfloat16 alike; a contiguous buffer is what it sends.
        buffer = x if x.is_contiguous() else x.contiguous()
        self.group.allreduce([buffer]).wait()
        self.all_reduce_s += time.perf_counter() - started
        self.num_all_reduces += 1
        return buffer

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] on each rank -> [rows, size * cols], rank order (the vocabulary's slices)."""
        started = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x]).wait()
        self.all_gather_s += time.perf_counter() - started
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of each rank's `value` (what every rank can hold, e.g. KV blocks)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        self.group.allreduce([tensor], dist.ReduceOp.MIN).wait()
        return int(tensor.item())

    def timings(self) -> dict:
        return dict(all_reduce_s=self.all_reduce_s, num_all_reduces=self.num_all_reduces,
                    all_gather_s=self.all_gather_s)
