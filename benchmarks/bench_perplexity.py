"""Perplexity on real text through Punctual's own engine (prompt logprobs), per engine variant.

What an approximation costs in accuracy: an int8 KV cache (and, where the engine has them,
quantized weights) against the model's own dtype, on the same documents, scored the way an
evaluation harness scores a text (the sum of each token's logprob given the ones before it).

    python benchmarks/bench_perplexity.py [--model smollm2] [--docs 12] [--tokens 512]
        [--variants "bf16=;int8-kv=kv_cache_dtype:int8"]

A variant is NAME=KEY:VALUE,KEY:VALUE of engine keyword arguments (empty: the defaults). The
text is standard-library documentation (punctual.bench.corpus): real English prose and code
identifiers, shipped with Python, not downloaded. Give every variant a small
`max_num_batched_tokens` (e.g. 64) to measure a KV cache format: a prompt prefilled in one
chunk attends to its own fresh K/V, not to the cache, so only later chunks read the cache.
"""
from __future__ import annotations

import argparse
import math
import time


def parse_variants(text: str) -> dict[str, dict]:
    variants = {}
    for item in text.split(";"):
        name, _, spec = item.partition("=")
        kwargs = {}
        for pair in filter(None, spec.split(",")):
            key, _, value = pair.partition(":")
            kwargs[key] = int(value) if value.isdigit() else value
        variants[name.strip()] = kwargs
    return variants


def documents_as_tokens(tokenizer, num_docs: int, num_tokens: int) -> list[list[int]]:
    from punctual.bench.corpus import documents

    docs = []
    for text in documents():
        ids = tokenizer.encode(text)
        if len(ids) >= num_tokens:
            docs.append(ids[:num_tokens])
        if len(docs) == num_docs:
            break
    return docs


def perplexity(model: str, docs: list[list[int]], **engine_kwargs) -> tuple[float, float]:
    """(perplexity over every scored token of every document, seconds)."""
    from punctual import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": d} for d in docs],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
    elapsed = time.perf_counter() - started
    total, count = 0.0, 0
    for out in outputs:
        for entry in out.prompt_logprobs[1:]:
            total += entry.logprob
            count += 1
    return math.exp(-total / count), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--docs", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--variants", default="bf16=dtype:bfloat16;int8-kv=dtype:bfloat16,kv_cache_dtype:int8")
    args = parser.parse_args()
    from punctual.tokenizer import load_tokenizer
    from punctual.checkpoints.loader import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(args.model))
    docs = documents_as_tokens(tokenizer, args.docs, args.tokens)
    print(f"{args.model}: {len(docs)} documents x {args.tokens} tokens of standard-library documentation")
    baseline = None
    for name, kwargs in parse_variants(args.variants).items():
        ppl, seconds = perplexity(args.model, docs, **kwargs)
        baseline = baseline or ppl
        print(f"{name:14s} perplexity {ppl:8.4f}  ({(ppl / baseline - 1) * 100:+.2f}% vs {next(iter(parse_variants(args.variants)))})"
              f"  scored in {seconds:.1f} s")


if __name__ == "__main__":
    main()
