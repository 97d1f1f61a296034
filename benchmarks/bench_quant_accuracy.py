"""Perplexity of smollm2 with bf16, int8 and int4 weights, on text that ships with Python.

The text: the docstrings of a few standard-library modules, the Zen of Python (`this`) and
CPython's LICENSE, cut into windows of --tokens tokens; each window is scored by the engine
itself (prompt_logprobs), so the numbers cover the quantized kernels and the paged attention.
Also: how often the greedy continuation of each window agrees with bf16's, token by token.

    python benchmarks/bench_quant_accuracy.py                      # ~3 minutes on 2 quiet cores
    python benchmarks/bench_quant_accuracy.py --variants none,int8,int4,int4-head4
    python benchmarks/bench_quant_accuracy.py --variants none-eager,none   # fused kernels against eager
    python benchmarks/bench_quant_accuracy.py --variants none,int4-a16,int4 --max-batched-tokens 16  # decode's kernels

A variant ending in -eager runs with enforce_eager (plain PyTorch ops); the others use the fused
CPU kernels where they build.
"""
from __future__ import annotations

import argparse
import codecs
import glob
import inspect
import math
import sys
import time

MODULES = ("json", "argparse", "collections", "textwrap", "difflib", "heapq", "bisect", "functools",
           "itertools", "pathlib", "unittest", "logging", "csv", "string", "subprocess", "typing")


def corpus() -> str:
    import contextlib
    import importlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (prints the Zen on import; its source holds it in ROT13)

    parts = [codecs.decode(sys.modules["this"].s, "rot13")]
    for name in MODULES:
        doc = inspect.getdoc(importlib.import_module(name))
        if doc:
            parts.append(doc)
    for path in sorted(glob.glob(f"{sys.base_prefix}/lib/python3*/LICENSE*"))[:1]:
        parts.append(open(path, encoding="utf-8").read())
    return "\n\n".join(parts)


def windows(tokenizer, text: str, size: int, count: int) -> list[list[int]]:
    ids = tokenizer.encode(text)
    step = max(size, (len(ids) - size) // max(count - 1, 1))
    return [ids[start:start + size] for start in range(0, len(ids) - size + 1, step)][:count]


def score(llm, prompts: list[list[int]], greedy_tokens: int):
    from punctual import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=greedy_tokens, prompt_logprobs=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    nll = [-lp.logprob for out in outputs for lp in out.prompt_logprobs if lp is not None]
    return math.exp(sum(nll) / len(nll)), len(nll), [out.outputs[0].token_ids for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per window")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--greedy-tokens", type=int, default=32, help="greedy continuation per window")
    parser.add_argument("--max-batched-tokens", type=int, default=2048,
                        help="tokens per engine step; 16 or less scores the prompts through the fused "
                             "small-batch kernels (decode's path) instead of the prefill GEMMs")
    parser.add_argument("--variants", default="none,int8,int4",
                        help="none | int8 | int4, and int4-head4 / int8-head16 / int4-head16 for other heads; "
                             "a -eager suffix runs without the fused kernels; -a16 runs int4's fused kernel on "
                             "bf16 activations instead of int8")
    args = parser.parse_args()
    import punctual.kernels.quant as quant
    from punctual import LLM

    text = corpus()
    results = []
    for variant in args.variants.split(","):
        eager = variant.endswith("-eager")
        bf16_activations = "-a16" in variant
        kind, _, head = variant.removesuffix("-eager").replace("-a16", "").partition("-head")
        quant.HEAD_QUANTIZATION.update({"int8": "int8", "int4": "int8"})
        if head:
            quant.HEAD_QUANTIZATION[kind] = {"4": "int4", "8": "int8", "16": "none"}[head]
        start = time.perf_counter()
        llm = LLM(args.model, dtype=args.dtype, quantization=kind, kv_cache_memory="512MiB",
                  max_num_batched_tokens=args.max_batched_tokens, enforce_eager=eager,
                  int4_int8_activations=not bf16_activations)
        prompts = windows(llm.tokenizer, text, args.tokens, args.windows)
        ppl, count, greedy = score(llm, prompts, args.greedy_tokens)
        results.append((variant, ppl, count, greedy, time.perf_counter() - start))
        del llm
    base_ppl, base_greedy = results[0][1], results[0][3]
    print(f"\n{args.model} ({args.dtype}), {len(base_greedy)} windows of {args.tokens} tokens from Python's "
          f"docstrings, Zen and LICENSE; greedy continuations of {args.greedy_tokens} tokens")
    print("| weights | perplexity | vs first | greedy tokens equal to the first's (before the first difference) | s |")
    print("|---|---|---|---|---|")
    for variant, ppl, count, greedy, seconds in results:
        same = sum(a == b for x, y in zip(base_greedy, greedy) for a, b in zip(x, y))
        prefix = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                     for x, y in zip(base_greedy, greedy))
        total = sum(len(x) for x in base_greedy)
        print(f"| {variant} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {same}/{total} ({prefix}) | "
              f"{seconds:.0f} |")


if __name__ == "__main__":
    main()
