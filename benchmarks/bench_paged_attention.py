"""The fused paged-attention kernel alone: decode tokens over long contexts, bf16 against int8 caches.

smollm2's head shape (9 query heads, 3 KV heads, head dim 64), blocks of 16 scattered at random
in the pool, one decode token per sequence; the minimum and median milliseconds per call over
ROUNDS rounds of REPS calls. `--library` loads another build of the kernels (each build is cached
under ~/.cache/punctual/kernels/<hash>/), so two commits' kernels compare in alternated processes:

    python benchmarks/bench_paged_attention.py
    python benchmarks/bench_paged_attention.py --library ~/.cache/punctual/kernels/<hash>/punctual_cpu_kernels.so
"""
from __future__ import annotations

import argparse
import statistics

import torch
from bench_decode_step import timed  # this folder's: three calls to warm up, then each call timed

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
ROUNDS, REPS = 3, 60


def min_and_median_ms(fn) -> tuple[float, float]:
    times = timed(fn, REPS)
    return min(times) * 1e3, statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", help="a built punctual_cpu_kernels.so (default: this checkout's)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--context", type=int, default=1900)
    args = parser.parse_args()
    if args.library:
        torch.ops.load_library(args.library)
    else:
        from punctual.kernels import cpu_kernels

        if cpu_kernels.load() is None:
            raise SystemExit(f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    op = torch.ops.punctual.paged_attention
    torch.manual_seed(0)
    n, ctx = args.sequences, args.context
    per_sequence = -(-ctx // BLOCK)
    num_blocks = n * per_sequence + 1
    tables = (torch.randperm(num_blocks - 1)[:n * per_sequence] + 1).view(n, per_sequence)
    q = torch.randn(n, HEADS, HEAD_DIM).bfloat16()
    seq_of_token, positions = torch.arange(n), torch.full((n,), ctx - 1, dtype=torch.long)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k16, v16 = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    k8, v8 = (torch.randint(-127, 128, shape, dtype=torch.int8) for _ in range(2))
    k_scale, v_scale = (torch.rand(shape[:3]) * 0.01 for _ in range(2))
    scale = HEAD_DIM ** -0.5
    print(f"paged_attention, {n} decode tokens x {ctx}-token contexts, {torch.get_num_threads()} threads "
          f"(ms per call: min / median of {REPS})")
    for _ in range(ROUNDS):
        bf16 = min_and_median_ms(lambda: op(q, k16, v16, tables, seq_of_token, positions, 0, scale))
        int8 = min_and_median_ms(lambda: op(q, k8, v8, tables, seq_of_token, positions, 0, scale, k_scale, v_scale))
        print(f"bf16 cache {bf16[0]:.3f} / {bf16[1]:.3f}   int8 cache {int8[0]:.3f} / {int8[1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
