"""Measure the all-reduce the tensor-parallel ranks use (torch.distributed, gloo) on this host.

Two local processes all-reduce float32 tensors of each size many times; the median time per
all-reduce is fitted as seconds = fixed + bytes x per_byte. The link handed to the planner
(punctual/sim/tensor_parallel.py's Link) is the one whose star all-reduce of two ranks (2 rounds
of latency + bytes / bandwidth) takes exactly those times: latency_s = fixed / 2, bytes_per_s =
2 / per_byte. Between two processes of one host this is gloo's software cost over loopback TCP,
the floor of any link; between machines add the network's own latency.
Imports torch; nothing on the simulator's run path imports this module.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

DEFAULT_SIZES = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)  # 1 KB .. 4 MB


def _worker(rank: int, size: int, port: int, sizes: tuple[int, ...], iterations: int, results) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank, as --threads-per-rank 1 on a 2-core host
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, datetime.timedelta(seconds=60))
    group = dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=60))
    medians = []
    for nbytes in sizes:
        tensor = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        # Fewer repetitions of the large sizes: their time is bandwidth, steady from run to run.
        count = max(5, min(iterations, int(iterations * (1 << 16) / max(nbytes, 1 << 16))))
        for _ in range(3):  # warm-up: first-call allocations and connection set-up stay out
            group.allreduce([tensor]).wait()
        times = []
        for _ in range(count):
            started = time.perf_counter()
            group.allreduce([tensor]).wait()
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    if rank == 0:
        results.put(medians)
    group.barrier().wait()  # neither leaves while the other still needs the store


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_allreduce(sizes: tuple[int, ...] = DEFAULT_SIZES, iterations: int = 200, ranks: int = 2,
                      timeout_s: float = 300.0, log: Callable[[str], None] = print) -> dict:
    """All-reduce times of `ranks` local gloo processes per size, and the fitted link:
    {"sizes", "seconds", "latency_s", "bytes_per_s", "source"} (load_link reads it)."""
    import multiprocessing
    import queue

    import numpy as np

    if ranks < 2:
        raise ValueError(f"ranks must be >= 2 to measure an all-reduce, got {ranks}")
    if not sizes or min(sizes) < 4:
        raise ValueError(f"sizes: at least one size of 4 bytes or more, got {sizes}")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, ranks, port, tuple(sizes), iterations, results))
                 for rank in range(ranks)]
    for process in processes:
        process.start()
    try:
        seconds = results.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"all-reduce measurement: no result within {timeout_s:.0f} s") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    x = np.stack([np.ones(len(sizes)), np.asarray(sizes, dtype=float)], axis=1)
    (fixed, per_byte), *_ = np.linalg.lstsq(x, np.asarray(seconds), rcond=None)
    if per_byte <= 0:  # the sizes too small to see the bandwidth: the largest at its time
        per_byte = max(seconds) / max(sizes)
    if fixed <= 0:  # a fit through the origin or below: the smallest size's time is all fixed cost
        fixed = min(seconds)
    fixed = float(fixed)
    measured = {"sizes": list(sizes), "seconds": list(seconds), "ranks": ranks,
                "allreduce_fixed_s": fixed, "allreduce_per_byte_s": float(per_byte),
                "latency_s": fixed / 2, "bytes_per_s": 2 / float(per_byte),
                "source": f"gloo all-reduce, {ranks} local processes, float32, sizes {min(sizes)}-{max(sizes)} B"}
    log(f"all-reduce: {fixed * 1e6:.1f} us + {1 / per_byte / 1e9:.2f} GB/s -> link latency "
        f"{measured['latency_s'] * 1e6:.1f} us per message, {measured['bytes_per_s'] / 1e9:.2f} GB/s")
    return measured


def save_link(measured: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(measured, indent=1) + "\n")
