"""The all-reduce tensor-parallel ranks pay per layer (torch.distributed gloo, 2 local processes):
median time per all-reduce and the bandwidth it reaches, for float32 tensors of 1 KB to 4 MB, and
the link latency per message and bandwidth fitted for `punctual sim plan --link-profile`.

    python benchmarks/bench_allreduce.py [--sizes 1024,4096,...] [--iterations 200] [--output link.json]
    punctual sim plan --hardware cpu-4c --model llama-2-70b --tpot-slo-ms 200 --link-profile link.json
"""
from __future__ import annotations

import argparse

from punctual.sim.calibrate_link import DEFAULT_SIZES, measure_allreduce, save_link
from punctual.bench.machine import cpu_line




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="tensor sizes in bytes")
    parser.add_argument("--iterations", type=int, default=200, help="all-reduces timed per size (fewer for large)")
    parser.add_argument("--output", default=None, help="write the measured link here (JSON) for --link-profile")
    args = parser.parse_args()
    sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    print(cpu_line())
    measured = measure_allreduce(sizes, args.iterations, log=lambda _: None)
    print(f"{'bytes':>10}  {'us per all-reduce':>18}  {'GB/s':>8}")
    for nbytes, seconds in zip(measured["sizes"], measured["seconds"]):
        print(f"{nbytes:>10}  {seconds * 1e6:>18.1f}  {nbytes / seconds / 1e9:>8.3f}")
    print(f"fit: all-reduce = {measured['allreduce_fixed_s'] * 1e6:.1f} us + bytes / "
          f"{1 / measured['allreduce_per_byte_s'] / 1e9:.2f} GB/s; as a link (star, 2 rounds): "
          f"{measured['latency_s'] * 1e6:.1f} us per message, {measured['bytes_per_s'] / 1e9:.2f} GB/s")
    if args.output:
        save_link(measured, args.output)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
