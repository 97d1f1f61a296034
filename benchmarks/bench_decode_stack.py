"""One decode stream with the layer stack in one kernel call (decode_stack) against the same
kernels called layer by layer, alternated in one process; optionally with busy processes beside
it, as a server's front end or a load generator would be on a small machine.

Layer by layer, each kernel's threads meet at a barrier, so a thread whose core another process
holds stalls every kernel of the step; decode_stack's threads claim work in chunks, so the
others take its share. Prints ms per token for each, per round and the medians.

    python benchmarks/bench_decode_stack.py                      # smollm2 bf16, quiet machine
    python benchmarks/bench_decode_stack.py --burners 2          # two busy processes beside it
    python benchmarks/bench_decode_stack.py --quantization int4 --rounds 5
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time


def burn(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--burners", type=int, default=0, help="busy processes running beside the engine")
    args = parser.parse_args()

    import torch

    from punctual import LLM, SamplingParams

    llm = LLM(args.model, dtype="bfloat16", quantization=args.quantization)
    model = llm.engine.core.runner.model
    stack_args = model._stack  # the A/B flips this model's stack in place: one load, alternating rounds
    if stack_args is None:
        raise SystemExit("decode_stack is not available here (no fused kernels, or a linear without one)")
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
    prompt = "Tell me a long story about a dragon who lived in the mountains and " * 8
    llm.generate([prompt], params, use_tqdm=False)  # warm-up

    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(stop,), daemon=True) for _ in range(args.burners)]
    for process in burners:
        process.start()
    ms = {True: [], False: []}
    tokens = {}
    try:
        for _ in range(args.rounds):
            for stack in (True, False):
                model._stack = stack_args if stack else None
                start = time.perf_counter()
                out = llm.generate([prompt], params, use_tqdm=False)
                ms[stack].append((time.perf_counter() - start) / args.tokens * 1000)
                tokens[stack] = out[0].outputs[0].token_ids
    finally:
        model._stack = stack_args
        stop.set()
        for process in burners:
            process.join(5)
    print(f"{args.model} {args.quantization}, {torch.get_num_threads()} threads, {args.burners} busy processes beside")
    for stack, label in ((True, "decode_stack  "), (False, "layer by layer")):
        print(f"{label} ms/token: " + " ".join(f"{x:.2f}" for x in ms[stack]) + f"   median {statistics.median(ms[stack]):.2f}")
    print(f"layer by layer / decode_stack: {statistics.median(ms[False]) / statistics.median(ms[True]):.2f}x; "
          f"same tokens: {tokens[True] == tokens[False]}")


if __name__ == "__main__":
    main()
