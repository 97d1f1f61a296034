"""Decode and prefill speed of weight variants side by side, in one process, rounds interleaved.

For each variant (an engine built with those arguments): decode tok/s at 1 and 32 streams
(128-token distinct prompts, prefilled first, then `--steps` timed decode steps of the engine)
and prefill tok/s of one 512-token prompt (one step of 512 tokens, prefix caching off). Every
round measures every variant, so drift in a shared machine's speed hits them alike; the table
gives medians over rounds and the ratio to the first variant.

    python benchmarks/bench_speed.py                         # smollm2: eager, fused bf16, int8, int4, batch-invariant
    python benchmarks/bench_speed.py --threads 1 --rounds 5  # on a busy machine: less noise
    python benchmarks/bench_speed.py --variants bf16=dtype:bfloat16 int8=quantization:int8
    PUNCTUAL_KERNELS_ISA=avx2 python benchmarks/bench_speed.py   # the portable AVX2 build against eager

The fused variants run the kernel build this CPU gets (AVX-512 BF16, else AVX2 or NEON), or the one
PUNCTUAL_KERNELS_ISA names; the table's header says which, with the CPU's model and vector features.

A variant is NAME=key:value,key:value (engine arguments; dtype defaults to bfloat16).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

DEFAULT_VARIANTS = ("eager=enforce_eager:true", "bf16=dtype:bfloat16", "int8=quantization:int8",
                    "int4=quantization:int4", "invariant=batch_invariant:true")


KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_line() -> str:
    """The CPU's model name, its vector features that pick a kernel build, and the build loaded."""
    from punctual.kernels import cpu_kernels

    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    features = " ".join(f for f in KERNEL_FEATURES if f in flags) or "none of " + " ".join(KERNEL_FEATURES)
    cpu_kernels.load()
    build = cpu_kernels.loaded_variant() or f"none ({cpu_kernels.unavailable_reason()})"
    from punctual.kernels import tune_table

    return (f"{model}; features: {features}; fused kernel build: {build}; "
            f"kernel table: {tune_table.kernel_table().describe()}")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    kwargs = {"dtype": "bfloat16"}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        kwargs[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value.lower(), value)
    return name, kwargs


def decode_tok_s(llm, streams: int, steps: int, prompt_len: int, rng: random.Random) -> float:
    from punctual import SamplingParams

    engine, scheduler = llm.engine, llm.engine.core.scheduler
    vocab = engine.core.vocab_size
    ids = [f"d{streams}-{rng.random()}" for _ in range(streams)]
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for request_id in ids:
        engine.add_request(request_id, {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(prompt_len)]},
                           params)
    while scheduler.waiting or any(r.is_prefilling or r.num_output_tokens == 0 for r in scheduler.running):
        engine.step()
    engine.step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    for request_id in ids:
        engine.abort_request(request_id)
    return streams * steps / elapsed


def prefill_tok_s(llm, prompt_len: int, rng: random.Random) -> float:
    from punctual import SamplingParams

    engine = llm.engine
    vocab = engine.core.vocab_size
    prompt = [rng.randrange(100, vocab) for _ in range(prompt_len)]
    engine.add_request(f"p-{rng.random()}", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return prompt_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per measure")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from punctual import LLM

    variants = [parse_variant(v) for v in args.variants]
    engines = {}
    for name, kwargs in variants:
        start = time.perf_counter()
        engines[name] = LLM(args.model, kv_cache_memory="1GiB", max_num_seqs=max(args.streams),
                            max_num_batched_tokens=args.prefill_len, enable_prefix_caching=False, **kwargs)
        graphs = engines[name].engine.core.runner.decode_graphs
        captured = f", {len(graphs.steps)} decode graphs captured in {graphs.startup_s:.1f} s" if graphs else ""
        print(f"{name}: {kwargs}, built in {time.perf_counter() - start:.1f} s{captured}", flush=True)
    columns = [f"decode {n} stream{'s' if n > 1 else ''}" for n in args.streams] + [f"prefill {args.prefill_len}"]
    results: dict[str, dict[str, list[float]]] = {name: {c: [] for c in columns} for name, _ in variants}
    rng = random.Random(0)
    for round_ in range(args.rounds):
        for name, _ in variants:
            llm = engines[name]
            for n, column in zip(args.streams, columns):
                results[name][column].append(decode_tok_s(llm, n, args.steps, args.prompt_len, rng))
            results[name][columns[-1]].append(prefill_tok_s(llm, args.prefill_len, rng))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    first = variants[0][0]
    print(f"\n{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads; tok/s, median of "
          f"{args.rounds} interleaved rounds (ratio to {first}); decode: {args.steps} steps after "
          f"{args.prompt_len}-token prompts")
    print(cpu_line())
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, _ in variants:
        cells = []
        for column in columns:
            value = statistics.median(results[name][column])
            base = statistics.median(results[first][column])
            cells.append(f"{value:.0f} ({value / base:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
