"""Decode-step time of the engine at several batch sizes and context lengths, and the attention
kernel choice behind it.

1. Kernel: PyTorch's SDPA for one-token queries with grouped-query attention, called two ways:
   9 query heads with `enable_gqa=True` against 3 KV heads, and the same query heads grouped as
   3 rows of each KV head (what `punctual.models.attention.decode_attention` does).
2. Engine: `builtin` (bf16); n requests with ctx-token prompts (shared: one prefix for all, as
   a system prompt or RAG document), prefilled, then the median and p90 of 30 decode steps.

    python benchmarks/bench_decode_step.py
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_decode_step.py --skip-kernel   # compare commits
    python benchmarks/bench_decode_step.py --skip-kernel --kv-cache-dtype int8               # an int8 KV cache
    python benchmarks/bench_decode_step.py --skip-kernel --shape 16x1900                     # other shapes
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = ((1, 128, False), (8, 128, False), (16, 1104, True), (32, 600, False))


def timed(fn, repeats: int) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def kernel_rows(repeats: int) -> None:
    heads, kv_heads, head_dim, dtype = 9, 3, 64, torch.bfloat16
    print("SDPA for one-token queries, bf16, 9 query heads / 3 KV heads (ms per call, median)")
    print("| sequences | context | enable_gqa | grouped | speed-up |")
    print("|---|---|---|---|---|")
    for n, ctx in ((1, 128), (1, 1000), (8, 256), (16, 1104), (64, 300)):
        q = torch.randn(n, heads, 1, head_dim, dtype=dtype)
        k = torch.randn(n, ctx, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
        v = torch.randn(n, ctx, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
        mask = torch.ones(n, 1, 1, ctx, dtype=torch.bool)
        gqa = statistics.median(timed(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), repeats))
        grouped_q = q.view(n, kv_heads, heads // kv_heads, head_dim)
        grouped = statistics.median(timed(
            lambda: F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask), repeats))
        print(f"| {n} | {ctx} | {gqa * 1e3:.2f} | {grouped * 1e3:.2f} | {gqa / grouped:.1f}x |")


def engine_rows(model: str, steps: int, kv_cache_dtype: str = "auto", shapes=SHAPES) -> None:
    from punctual import LLM, SamplingParams

    llm = LLM(model, dtype="bfloat16", kv_cache_memory="2GiB", max_num_batched_tokens=2048,
              kv_cache_dtype=kv_cache_dtype)
    engine = llm.engine
    scheduler = engine.core.scheduler
    rng = random.Random(0)
    vocab = engine.core.vocab_size
    kv = "bf16" if kv_cache_dtype == "auto" else kv_cache_dtype
    print(f"\nDecode step of {model}, bf16 weights, {kv} KV cache (ms; {steps} steps)")
    print("| sequences | context | prompts | median | p90 |")
    print("|---|---|---|---|---|")
    for round_, (n, ctx, shared) in enumerate(shapes):
        prefix = [rng.randrange(100, vocab) for _ in range(ctx - 16)]
        for i in range(n):
            body = prefix if shared else [rng.randrange(100, vocab) for _ in range(ctx - 16)]
            prompt = body + [rng.randrange(100, vocab) for _ in range(16)]
            engine.add_request(f"{round_}-{i}", {"prompt_token_ids": prompt},
                               SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
        while scheduler.waiting or any(r.is_prefilling or r.num_output_tokens == 0 for r in scheduler.running):
            engine.step()
        times = timed(engine.step, steps)
        for i in range(n):
            engine.abort_request(f"{round_}-{i}")
        p90 = statistics.quantiles(times, n=10)[-1]
        print(f"| {n} | {ctx} | {'shared prefix' if shared else 'distinct'} | "
              f"{statistics.median(times) * 1e3:.1f} | {p90 * 1e3:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's bf16) or int8")
    parser.add_argument("--shape", action="append", metavar="SEQUENCESxCONTEXT",
                        help="instead of the default shapes, e.g. 16x1900 (distinct prompts); repeatable")
    args = parser.parse_args()
    import punctual

    print(f"punctual from {punctual.__file__}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if not args.skip_kernel:
        kernel_rows(30)
    shapes = SHAPES if not args.shape else [(*map(int, shape.lower().split("x")), False) for shape in args.shape]
    engine_rows(args.model, args.steps, args.kv_cache_dtype, shapes)


if __name__ == "__main__":
    main()
