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
layers is refused, and the table says so.

--peers llama.cpp adds llama.cpp's llama-server reading the checkpoint's GGUF (--llama-cpp-type,
bf16 by default: the same weights at the same precision, converted from the same checkpoint) through
mmap under the same budget in bytes (and, in a row of its own, under the same fraction of its own
weights: Punctual's bf16 weights in memory are about twice the GGUF). llama.cpp has no weight budget of its own (its mapped weights
are page cache the kernel evicts under pressure), so each configuration of both systems runs in a
fresh cgroup-v1 memory group (punctual/bench/cgroup.py; page cache is charged to the group, so
mapped weight pages beyond its limit are evicted and read again). The limit of a group is

    limit = budget + that system's non-weight overhead,
    overhead = peak RSS (VmHWM) of the system with every weight resident - its weight bytes

(Punctual: the weights as they sit in memory; llama.cpp: the GGUF's size), both measured in the
first, unlimited, run. Punctual also gets --max-weight-memory at the budget. Before each
configuration the files it reads are evicted from the page cache (posix_fadvise DONTNEED; pages a
group has not faulted in itself are not charged to it) and the kernel's page cache is dropped where
we may (echo 1 > /proc/sys/vm/drop_caches). llama.cpp's TPOT is its own decode timing
(timings.predicted_per_token_ms of /completion, median of --rounds), Punctual's the in-process one
above; peak memory is VmHWM and the group's memory.max_usage_in_bytes (anonymous memory plus page
cache). Needs root and a writable /sys/fs/cgroup/memory.

    python benchmarks/bench_weight_window.py --peers llama.cpp     # smollm2 bf16, both systems
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
    prompt = PROMPT

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


def run(args: argparse.Namespace, budget: int | None, group=None) -> dict:
    command = [sys.executable, __file__, "--child", "--model", args.model, "--dtype", args.dtype,
               "--quantization", args.quantization, "--tensor-parallel-size", str(args.tensor_parallel_size),
               "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
    if budget is not None:
        command += ["--budget", str(budget)]
    out = subprocess.run(command if group is None else group.wrap(command), capture_output=True, text=True)
    if out.returncode != 0:
        if group is not None and out.returncode < 0:  # a signal: the group's OOM killer, most likely
            return {"killed": f"killed by signal {-out.returncode} (OOM kills in the group: {group.oom_kills})"}
        raise SystemExit(f"configuration {budget} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


MIB = 2**20  # the comparison's unit: VmHWM and the cgroup files count in KiB and bytes
PROMPT = "Tell me a long story about a dragon who lived in the mountains and " * 4  # the child's prompt


def evict_inputs(paths: list[Path]) -> bool:
    """Evict every file a configuration reads from the page cache (so the next run faults its
    weights in, charged to its own group), then ask the kernel to drop its page cache; False
    where that was refused."""
    from punctual.bench.cgroup import drop_caches, evict_file

    for root in paths:
        for path in ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())):
            try:
                evict_file(path)
            except OSError:
                pass  # unreadable or gone: not something this run reads
    return drop_caches()


def llama_cpp_run(args: argparse.Namespace, limit: int | None, name: str) -> dict:
    """llama-server in a fresh memory group of `limit` bytes (None: unlimited, measured only):
    llama.cpp's own decode timing over --rounds requests, its VmHWM and the group's peak."""
    import dataclasses
    import tempfile

    import httpx

    from punctual.bench.cgroup import MemoryCgroup, process_peak_rss_kb
    from punctual.bench.peers import PeerOptions, PeerUnavailable, llama_cpp_peer, free_port, running

    # One slot with a small context (a short prompt and --tokens), no host prompt cache: the
    # overhead beyond the mapped weights is small and the same in every configuration.
    options = PeerOptions(max_num_seqs=1, threads=args.threads, slot_context=512)
    spec = llama_cpp_peer(args.model, free_port(), options, args.llama_cpp_type)
    body = {"prompt": PROMPT, "n_predict": args.tokens, "ignore_eos": True, "temperature": 0.0,
            "cache_prompt": False}
    log = Path(tempfile.mkdtemp(prefix="weight-window-")) / "llama-server.log"
    with MemoryCgroup(name, limit_bytes=limit) as group:
        spec = dataclasses.replace(spec, command=group.wrap(spec.command + ["--cache-ram", "0"]))
        try:
            with running(spec, log) as endpoint, httpx.Client(trust_env=False, timeout=3600) as client:
                def decode_ms() -> float:
                    response = client.post(f"{endpoint.base_url}/completion", json=body)
                    response.raise_for_status()
                    return response.json()["timings"]["predicted_per_token_ms"]

                decode_ms()  # warm-up: the first pass faults the weights in
                tpots = [decode_ms() for _ in range(args.rounds)]
                peak_kb = max((process_peak_rss_kb(pid) or 0) for pid in group.pids())
        except (PeerUnavailable, httpx.HTTPError) as error:
            return {"killed": f"{type(error).__name__}: {str(error)[-300:]} (OOM kills in the group: "
                              f"{group.oom_kills})"}
        return {"tpot_ms": statistics.median(tpots), "peak_rss_mb": peak_kb / 1024,
                "group_peak_mb": group.max_usage_bytes / MIB, "gguf": spec.command[spec.command.index("-m") + 1]}


def compare_with_llama_cpp(args: argparse.Namespace) -> None:
    """Both systems at each budget, each configuration in its own memory group (module docstring)."""

    from punctual.bench.cgroup import MemoryCgroup, memory_controller_writable
    from punctual.checkpoints.builtin import cache_root
    from punctual.checkpoints.loader import resolve_model_path

    if not memory_controller_writable():
        raise SystemExit("--peers llama.cpp needs a writable cgroup-v1 memory controller at /sys/fs/cgroup/memory "
                         "(root): without a memory limit llama.cpp's mapped weights all stay resident")
    # SIGTERM unwinds like Ctrl-C, so every child is stopped and every group removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    checkpoint = resolve_model_path(args.model)
    inputs = [checkpoint, cache_root() / "layers"]  # Punctual's checkpoint and its finished-layer cache
    prefix = f"punctual-weight-window-{os.getpid()}"
    dropped = True

    def punctual_run(budget: int | None, limit: int | None, label: str) -> dict:
        nonlocal dropped
        dropped &= evict_inputs(inputs)
        with MemoryCgroup(f"{prefix}-punctual-{label}", limit_bytes=limit) as group:
            result = run(args, budget, group)
            result["group_peak_mb"] = group.max_usage_bytes / MIB
        return result

    def llama_run(limit: int | None, label: str, gguf: Path | None) -> dict:
        nonlocal dropped
        dropped &= evict_inputs(inputs + ([gguf] if gguf else []))
        return llama_cpp_run(args, limit, f"{prefix}-llama-{label}")

    print(cpu_line())
    whole = punctual_run(None, None, "whole")
    weights = whole["weights"]
    punctual_overhead = whole["peak_rss_mb"] * MIB - weights
    llama_whole = llama_run(None, "whole", None)
    if "killed" in llama_whole:
        raise SystemExit(f"llama.cpp did not run with no limit: {llama_whole['killed']}")
    gguf = Path(llama_whole["gguf"])
    gguf_bytes = gguf.stat().st_size
    llama_overhead = llama_whole["peak_rss_mb"] * MIB - gguf_bytes
    print(f"\n{args.model}, 1 stream, {args.tokens} tokens x {args.rounds} rounds (median), {args.threads} threads; "
          f"Punctual {args.dtype} quantization {args.quantization}: weights in memory {weights / MIB:.0f} MiB, "
          f"{whole['num_layers']} layers; llama.cpp: {gguf.name} ({gguf_bytes / MIB:.0f} MiB, mmap)")
    print(f"cgroup limit = budget + non-weight overhead (VmHWM with every weight resident - weight bytes): "
          f"Punctual {punctual_overhead / MIB:.0f} MiB, llama.cpp {llama_overhead / MIB:.0f} MiB")
    print("| budget | system | cgroup limit MiB | window | TPOT ms | VmHWM MiB | cgroup peak MiB |")
    print("|---|---|---|---|---|---|---|")

    def row(label: str, system: str, limit: int | None, result: dict) -> None:
        limit_mb = "none" if limit is None else f"{limit / MIB:.0f}"
        if "refused" in result or "killed" in result:
            reason = result.get("refused") or result["killed"]
            print(f"| {label} | {system} | {limit_mb} | {'refused' if 'refused' in result else 'failed'}: "
                  f"{reason.splitlines()[0][:200]} | | | |", flush=True)
            return
        window = "-"
        if system == "punctual" and "window" in result:
            window = f"{result['window']}/{result['num_layers']}" if result["window"] else "all"
        print(f"| {label} | {system} | {limit_mb} | {window} | {result['tpot_ms']:.2f} | "
              f"{result['peak_rss_mb']:.0f} | {result['group_peak_mb']:.0f} |", flush=True)

    row("all resident", "punctual", None, whole)
    row("all resident", f"llama.cpp {args.llama_cpp_type}", None, llama_whole)
    for fraction in (float(f) for f in args.fractions.split(",")):
        budget = int(weights * fraction)
        label = f"{fraction:g} ({budget / MIB:.0f} MiB; {budget / gguf_bytes:.2f} of the GGUF)"
        limit = int(budget + punctual_overhead)
        row(label, "punctual", limit, punctual_run(budget, limit, f"{fraction:g}"))
        limit = int(budget + llama_overhead)
        row(label, f"llama.cpp {args.llama_cpp_type}", limit, llama_run(limit, f"{fraction:g}", gguf))
        # Punctual holds bf16 linears in two layouts, so the same bytes can be most of the GGUF:
        # llama.cpp at the same fraction of its own weights too.
        own = int(gguf_bytes * fraction)
        limit = int(own + llama_overhead)
        row(f"{fraction:g} of the GGUF ({own / MIB:.0f} MiB)", f"llama.cpp {args.llama_cpp_type}", limit,
            llama_run(limit, f"{fraction:g}-own", gguf))
    if not dropped:
        print("(/proc/sys/vm/drop_caches was refused: only the files each run reads were evicted)")


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
    parser.add_argument("--peers", default="", help="llama.cpp: also llama-server reading the GGUF through mmap "
                        "under the same budget, every configuration of both in a memory cgroup (root)")
    parser.add_argument("--llama-cpp-type", default="bf16",
                        help="the GGUF llama.cpp reads: bf16 | f16 | f32 (converted from the checkpoint) | q4_0 ...")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads (-t, -tb)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.peers:
        if args.peers != "llama.cpp":
            parser.error(f"--peers: only llama.cpp is supported, got {args.peers!r}")
        compare_with_llama_cpp(args)
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
