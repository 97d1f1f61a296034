"""Tensor parallelism on one host: decode speed of a model split across N rank processes against
the whole model in one process with the same cores, at 1 and 32 streams.

Each configuration RANKSxTHREADS runs in a fresh process (so its peak resident memory is its own):
it generates `--tokens` tokens per stream after a short prompt, and reports TPOT (the decode
steps' time per token of one stream), tokens/s over all streams, the all-reduces' share of the
decode time (timed inside every rank: the time a rank spends inside the collective, waiting for
its peers included; prefill steps too), the mean time of one layer's pair of all-reduces per step,
and each rank's resident memory at the end and its peak (each rank reads only its shard of the
split tensors, plus the replicated ones whole). `--all-reduce shm,gloo` runs each split
configuration with either all-reduce (the shared-memory one, the default, and gloo's alone).

    python benchmarks/bench_tensor_parallel.py                               # smollm2 bf16: 1x2 vs 3x1
    python benchmarks/bench_tensor_parallel.py --all-reduce shm,gloo         # the same, both all-reduces
    python benchmarks/bench_tensor_parallel.py --configs 1x2,2x1 --model builtin-tiny --tokens 4 --streams 1,2

smollm2 has 9 attention heads and 3 KV heads: it splits across 3 ranks, not 2 (a size that does
not divide the heads is refused); a model with an even head count compares 1x2 with 2x1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def cpu_line() -> str:
    """lscpu's model name and the flags that pick the kernels."""
    name, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return f"{name}; {os.cpu_count()} CPUs; flags: {' '.join(f for f in wanted if f in flags) or 'none of AVX2/512'}"


def run_one(args: argparse.Namespace, ranks: int, threads: int) -> dict:
    """One configuration, in this process: load, warm up, then time each stream count."""
    import torch

    from punctual import LLM, SamplingParams

    torch.set_num_threads(threads)  # rank 0 / the whole model (the ranks get threads_per_rank)
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, tensor_parallel_size=ranks,
              threads_per_rank=threads, max_num_seqs=max(args.streams), kv_cache_memory="256MiB")
    core = llm.engine.core
    runner = core.runner
    num_layers = runner.arch.num_layers
    prompt = list(range(100, 100 + args.prompt_tokens))
    results = []
    try:
        warm_up = SamplingParams(max_tokens=4, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompt}], warm_up, use_tqdm=False)
        for streams in args.streams:
            prompts = [{"prompt_token_ids": [t + s for t in prompt]} for s in range(streams)]

            before = runner.rank_stats() if ranks > 1 else []
            steps = core.num_steps
            started = time.perf_counter()
            outputs = llm.generate(prompts, SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0),
                                   use_tqdm=False)
            seconds = time.perf_counter() - started
            after = runner.rank_stats() if ranks > 1 else []
            steps = core.num_steps - steps
            # The core's own TPOT per request (first token to last), averaged over the streams.
            tpot_ms = sum(o.outputs[0].metrics["tpot_ms"] for o in outputs) / len(outputs)
            row = dict(streams=streams, tpot_ms=tpot_ms, tok_s=streams * 1000 / tpot_ms)
            if after:
                # The slowest rank's time in the all-reduces, over the whole run (its prefill steps too).
                spent = max(a["all_reduce_s"] - b["all_reduce_s"] for a, b in zip(after, before))
                row["all_reduce_share"] = spent / seconds
                row["all_reduce_ms_per_layer"] = spent / steps / num_layers * 1000
            results.append(row)
        all_reduce = "-"
        if ranks > 1:
            stats = runner.rank_stats()
            rss = [(s["rss_bytes"], s["peak_rss_bytes"]) for s in stats]
            all_reduce = stats[0]["all_reduce"]  # what the group runs (gloo where shared memory could not be set up)
        else:
            from punctual.runner.tensor_parallel import resident_bytes

            rss = [(resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)]
    finally:
        core.close()
    return dict(ranks=ranks, threads=threads, all_reduce=all_reduce, rows=results, peak_rss=rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--configs", default="1x2,3x1", help="RANKSxTHREADS_PER_RANK, comma-separated")
    parser.add_argument("--streams", default="1,32", help="concurrent decode streams, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per stream")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--all-reduce", default="shm",
                        help="the split configurations' all-reduce, comma-separated: shm (shared memory), gloo")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    all_reduces = args.all_reduce.split(",")
    if not set(all_reduces) <= {"shm", "gloo"}:
        parser.error(f"--all-reduce takes shm and/or gloo, got {args.all_reduce!r}")
    if args.tokens < 2:
        parser.error("--tokens must be >= 2 (one prefill token, then decodes)")
    if args.one:
        ranks, threads = (int(x) for x in args.one.split("x"))
        print("RESULT " + json.dumps(run_one(args, ranks, threads)), flush=True)
        return

    print(cpu_line())
    print(f"model {args.model} {args.dtype} quantization {args.quantization}; {args.tokens} tokens per stream "
          f"after {args.prompt_tokens} prompt tokens")
    print(f"{'ranks x threads':>15} {'AR':>4} {'streams':>7} {'TPOT ms':>8} {'tok/s':>8} {'all-reduce %':>12} "
          f"{'AR ms/layer':>11}  RSS now/peak per rank (MiB)")
    for config in args.configs.split(","):
        split = int(config.split("x")[0]) > 1
        for all_reduce in all_reduces if split else ["-"]:
            command = [sys.executable, __file__, "--one", config, "--model", args.model, "--dtype", args.dtype,
                       "--quantization", args.quantization, "--streams", ",".join(map(str, args.streams)),
                       "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens)]
            # The punctual beside this script (not another checkout an installed path points at);
            # the ranks inherit the all-reduce's variable, which rank 0 reads (runner/tensor_parallel.py).
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            if split:
                env["PUNCTUAL_TP_ALL_REDUCE"] = all_reduce
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{config:>15} {all_reduce:>4} failed: {reason}")
                continue
            result = json.loads(lines[-1].removeprefix("RESULT "))
            rss = " ".join(f"{now / 2**20:.0f}/{peak / 2**20:.0f}" for now, peak in result["peak_rss"])
            for row in result["rows"]:
                share = f"{row['all_reduce_share'] * 100:.1f}" if "all_reduce_share" in row else "-"
                per_layer = f"{row['all_reduce_ms_per_layer']:.3f}" if "all_reduce_ms_per_layer" in row else "-"
                print(f"{config:>15} {result['all_reduce']:>4} {row['streams']:>7} {row['tpot_ms']:>8.2f} "
                      f"{row['tok_s']:>8.1f} {share:>12} {per_layer:>11}  {rss}")


if __name__ == "__main__":
    main()
