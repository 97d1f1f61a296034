"""TPOT and peak resident memory of one decode stream with every weight resident against
--max-weight-memory at fractions of the model's weights (a sliding window of layers read ahead
of use, TPI-LLM, from the finished-layer cache the first windowed start-up writes under
PUNCTUAL_CACHE/layers). Each configuration runs in a fresh process, so its peak RSS (VmHWM) is its
own: start-up included.

    python benchmarks/bench_weight_window.py                          # smollm2 bf16: all, 1/2, 1/4
    python benchmarks/bench_weight_window.py --quantization int8         # int8 linears and head
    python benchmarks/bench_weight_window.py --model builtin-tiny --tokens 4 --fractions 1,0.9  # a smoke run
    python benchmarks/bench_weight_window.py --tensor-parallel-size 3  # smollm2 over 3 ranks

With --tensor-parallel-size N, the weights, fractions and budgets are one rank's (the budget is per
rank), and the peak RSS is the largest of the ranks' own.

The fraction is of the model's weights as they sit in memory (with the fused bf16 kernels, a
layer's linears are held in two layouts); a budget below the embeddings, final norm, head and two
layers is refused, and the table says so. llama.cpp reading the same GGUF through mmap under the
same budget is not measured here: llama.cpp has no weight budget of its own (its mmap'd pages are
page cache the kernel evicts under pressure), so a fair comparison needs a memory cgroup
(`systemd-run --scope -p MemoryMax=...`) around llama-server (punctual/bench/llama_cpp.py builds it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from punctual.bench.machine import cpu_line




def status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """One configuration: load, warm up, time decodes; prints one JSON line."""
    from punctual import LLM, SamplingParams
    from punctual.checkpoints.weight_stream import resident_bytes
    from punctual.models.weight_window import WeightWindow

    options = dict(dtype=args.dtype, quantization=args.quantization, max_num_seqs=4, kv_cache_memory="64MiB")
    if args.budget is not None:
        options["max_weight_memory"] = args.budget
    if args.tensor_parallel_size > 1:  # rank 0's shard below: the window and weights are per rank
        options["tensor_parallel_size"] = args.tensor_parallel_size
    try:
        llm = LLM(args.model, **options)
    except ValueError as error:
        print(json.dumps({"refused": str(error)}))
        return
    model = llm.engine.core.runner.model
    window = model.layers.size if isinstance(model.layers, WeightWindow) else None
    weights = None
    if window is None:  # every layer resident: the model's weights, for the fractions
        weights = resident_bytes([model.embed, model.norm, model.lm_head, model.rope_tables, model.layers])
    prompt = "Tell me a long story about a dragon who lived in the mountains and " * 4

    def seconds(tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    seconds(2)  # warm-up
    tpots = [(seconds(args.tokens) - seconds(1)) / (args.tokens - 1) * 1000 for _ in range(args.rounds)]
    peak_rss_mb = status_kb("VmHWM") / 1024
    if args.tensor_parallel_size > 1:  # each rank's own peak (rank 0 is this process): the largest
        peak_rss_mb = max(stats["peak_rss_bytes"] / 2**20 for stats in llm.engine.core.runner.rank_stats())
        llm.engine.core.close()
    print(json.dumps({"tpot_ms": statistics.median(tpots), "peak_rss_mb": peak_rss_mb,
                      "window": window, "num_layers": len(model.layers), "weights": weights}))


def run(args: argparse.Namespace, budget: int | None) -> dict:
    command = [sys.executable, __file__, "--child", "--model", args.model, "--dtype", args.dtype,
               "--quantization", args.quantization, "--tensor-parallel-size", str(args.tensor_parallel_size),
               "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
    if budget is not None:
        command += ["--budget", str(budget)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"configuration {budget} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default="none", help="none | int8 | int4 (the window's layers too)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model across this many ranks: weights, budgets and peak RSS per rank")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fractions", default="0.5,0.25", help="budgets as fractions of the model's weights")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(cpu_line())
    whole = run(args, None)
    weights = whole["weights"]
    print(f"\n{args.model} {args.dtype} quantization {args.quantization}, 1 stream, {args.tokens} tokens x {args.rounds} rounds (median); "
          f"weights in memory {weights / 1e6:.0f} MB, {whole['num_layers']} layers"
          + (f"; {args.tensor_parallel_size} ranks: weights, budgets and peak RSS per rank (the largest)"
             if args.tensor_parallel_size > 1 else ""))
    print(f"{'max_weight_memory':>22} {'window':>8} {'TPOT ms':>9} {'peak RSS MB':>12}")
    print(f"{'all resident':>22} {'-':>8} {whole['tpot_ms']:9.2f} {whole['peak_rss_mb']:12.0f}")
    for fraction in (float(f) for f in args.fractions.split(",")):
        budget = int(weights * fraction)
        label = f"{fraction:g} ({budget / 1e6:.0f} MB)"
        result = run(args, budget)
        if "refused" in result:
            print(f"{label:>22} refused: {result['refused']}")
            continue
        window = f"{result['window']}/{result['num_layers']}" if result["window"] else "all"
        print(f"{label:>22} {window:>8} {result['tpot_ms']:9.2f} {result['peak_rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
