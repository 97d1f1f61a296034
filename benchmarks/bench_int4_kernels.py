"""The small-batch int4 kernels against each other and bf16, per call, on smollm2's layer shapes.

linear_bf16 (bf16 weights), linear_int4 (nibbles widened to bf16, x as it is) and linear_int4_q8
(x quantized to int8 per group of 32, integer dot products) at 1, 4 and 16 rows; best of 7
batches of calls, on one thread unless --threads says otherwise. Compare ratios within a run.

    python benchmarks/bench_int4_kernels.py
"""
from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"qkv": (960, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def best_us(fn, calls: int = 200) -> float:
    fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from punctual.kernels import cpu_kernels
    from punctual.kernels.quant import quantize_int4

    ops = cpu_kernels.load()
    print("| layer | rows | bf16 us | int4 us | int4_q8 us | q8 / int4 | q8 / bf16 |\n|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        weight = (torch.randn(n, k) * 0.05).bfloat16()
        widened, q8 = quantize_int4(weight), quantize_int4(weight)
        widened.attach_fused(ops, int8_activations=False)
        q8.attach_fused(ops)
        packed = ops.pack_bf16(weight)
        for rows in args.rows:
            x = torch.randn(rows, k).bfloat16()
            bf16 = best_us(lambda: ops.linear_bf16(x, packed, None))
            int4 = best_us(lambda: widened.linear(x))
            int4_q8 = best_us(lambda: q8.linear(x))
            print(f"| {name} | {rows} | {bf16:.1f} | {int4:.1f} | {int4_q8:.1f} | {int4_q8 / int4:.2f} | "
                  f"{int4_q8 / bf16:.2f} |")


if __name__ == "__main__":
    main()
