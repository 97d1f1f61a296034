"""Speculative decoding: off vs fixed K vs adaptive, single stream and under load, side by side.

Two workloads: `repetitive` (greedy on prompts that repeat a line: prompt lookup finds what
comes next, and a random-weight model also falls into short loops, which lookup predicts) and
`sampled` (the same prompts sampled at temperature 1 with top-k 3: lookup still proposes on
most steps, but the target agrees with about one proposal in ten). For each concurrency, all
requests start together and run to a fixed length; reported: TPOT (ms per output token per
stream, median over streams) and the engine's output tokens/s, the median of several runs.

Every mode has its own engine, all loaded at once, and each run goes through the modes in turn
(rotating who goes first), so a slow minute of the machine lands on every mode alike.

    python benchmarks/bench_spec.py --model builtin --concurrency 1,8,32 --runs 5
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

MODES = {"off": {}, "fixed-4": dict(speculative_method="ngram", num_speculative_tokens=4),
         "adaptive-4": dict(speculative_method="ngram", num_speculative_tokens=4, speculative_length="adaptive"),
         "draft-fixed-4": dict(speculative_method="draft", num_speculative_tokens=4),
         "draft-adaptive-4": dict(speculative_method="draft", num_speculative_tokens=4, speculative_length="adaptive")}


KINDS = ("repetitive", "sampled")
REAL_KINDS = ("summarize", "code")  # real text (punctual.bench.corpus): where a trained model copies its context


def real_prompts(kind: str, count: int, tokenizer, seed: int) -> list[list[int]]:
    """Greedy prompts of real text: a summary asked through the chat template, or code to continue."""
    from punctual.bench.workloads import generate_workload

    requests = generate_workload(kind, count, seed=seed, length_scale=0.3 if kind == "summarize" else 0.5)
    if kind == "code":
        return [tokenizer.encode(r.prompt) for r in requests]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                           add_generation_prompt=True) for r in requests]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def prompts(kind: str, count: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if kind == "random":
            out.append([rng.randrange(100, vocab) for _ in range(96)])
        else:
            line = [rng.randrange(100, vocab) for _ in range(12)]
            out.append((line + [rng.randrange(100, vocab)]) * 8)
    return out


def run_once(llm, batch: list[list[int]], max_tokens: int, kind: str = "repetitive") -> tuple[float, float]:
    from punctual import SamplingParams

    engine = llm.engine
    first, last = {}, {}
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        if kind == "sampled":
            params = SamplingParams(temperature=1.0, top_k=3, max_tokens=max_tokens, ignore_eos=True, seed=i)
        else:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(f"s{i}-{start}", {"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
    elapsed = time.perf_counter() - start
    tpots = [(last[r] - first[r]) / (max_tokens - 1) for r in first]
    return statistics.median(tpots) * 1000, len(batch) * max_tokens / elapsed


def _spec_counts(llm) -> tuple[int, int]:
    stats = llm.engine.stats()
    return stats.spec_proposed_tokens, stats.spec_accepted_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--draft-model", default="builtin-draft",
                        help="draft checkpoint of the draft-* modes ('' skips them)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"prompt kinds, from {', '.join(KINDS + REAL_KINDS)} (real ones want a trained model)")
    args = parser.parse_args()
    kinds = args.kinds.split(",")

    from punctual import LLM

    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    modes = {m: dict(a) for m, a in MODES.items() if args.draft_model or not m.startswith("draft")}
    for spec_args in modes.values():
        if spec_args.get("speculative_method") == "draft":
            spec_args["speculative_model"] = args.draft_model
    engines = {mode: LLM(args.model, dtype=args.dtype, kv_cache_memory="1GiB", max_num_batched_tokens=512,
                         **spec_args) for mode, spec_args in modes.items()}
    vocab = next(iter(engines.values())).engine.core.vocab_size
    tokenizer = next(iter(engines.values())).engine.tokenizer
    for llm in engines.values():
        run_once(llm, prompts("random", 1, vocab, 99), 8)  # warm-up
    names = list(modes)
    for kind in kinds:
        for level in levels:
            runs: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
            counts = {m: _spec_counts(engines[m]) for m in names}
            for seed in range(args.runs):
                batch = real_prompts(kind, level, tokenizer, seed) if kind in REAL_KINDS else \
                    prompts(kind, level, vocab, seed)
                for mode in names[seed % len(names):] + names[:seed % len(names)]:
                    runs[mode].append(run_once(engines[mode], batch, args.max_tokens, kind))
            for mode in names:
                row = {"mode": mode, "prompts": kind, "concurrency": level,
                       "tpot_ms": statistics.median(r[0] for r in runs[mode]),
                       "tokens_per_s": statistics.median(r[1] for r in runs[mode]),
                       "tpot_ms_runs": [round(r[0], 2) for r in runs[mode]]}
                proposed, accepted = (a - b for a, b in zip(_spec_counts(engines[mode]), counts[mode]))
                if proposed:
                    row["proposed_per_token"] = proposed / (level * args.max_tokens * args.runs)
                    row["acceptance_rate"] = accepted / proposed
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| prompts | streams | " + " | ".join(f"{m} TPOT ms (tok/s)" for m in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for kind in kinds:
        for level in levels:
            cells = []
            for mode in modes:
                row = next(r for r in results if r["mode"] == mode and r["prompts"] == kind
                           and r["concurrency"] == level)
                cells.append(f"{row['tpot_ms']:.1f} ({row['tokens_per_s']:.0f})")
            print(f"| {kind} | {level} | " + " | ".join(cells) + " |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
