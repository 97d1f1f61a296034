"""The accuracy cost of the int8 KV cache (and of the int8 CPU tier, which uses the same format).

Two engines on one checkpoint, one with the model-dtype KV cache and one with int8, are fed the
same tokens: the prompt, then the unquantized engine's own greedy continuation (teacher forcing,
so every position compares like with like). At each generated position we record whether the
argmax agrees and the logit error (max |difference| over the vocabulary, and its ratio to the
logits' spread). A free-running check follows: the fraction of requests whose whole greedy
output is identical, and the mean position of the first difference.

Inputs: `random` (uniform random token ids), `text` (Python standard-library source, tokenized:
natural, structured text), `repeat` (a short random line repeated: long exact repeats).

    python benchmarks/bench_kv_int8.py --model builtin --dtype bfloat16 --prompts 8 --max-tokens 64
"""
from __future__ import annotations

import argparse
import random
import statistics
import sysconfig
from pathlib import Path


def make_prompts(kind: str, count: int, length: int, vocab: int, tokenizer, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    if kind == "random":
        return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]
    if kind == "repeat":
        out = []
        for _ in range(count):
            line = [rng.randrange(vocab) for _ in range(rng.randrange(8, 20))]
            out.append((line * (length // len(line) + 1))[:length])
        return out
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = []
    while len(out) < count:
        ids = tokenizer.encode(rng.choice(sources).read_text(encoding="utf-8", errors="replace"))
        if len(ids) > length:
            start = rng.randrange(len(ids) - length)
            out.append(ids[start:start + length])
    return out


def teacher_forced(runners, prompt: list[int], max_tokens: int):
    """Per generated position: (argmax agrees, max |logit diff|, that over the logits' std)."""
    from punctual.runner.runner import TokenChunk

    bs = runners[0].block_size
    table = list(range(-(-(len(prompt) + max_tokens) // bs)))
    logits = [r.last_logits([TokenChunk(prompt, 0, table)])[0].float() for r in runners]
    rows = []
    for step in range(max_tokens):
        ref, test = logits
        diff = (ref - test).abs().max().item()
        rows.append((int(ref.argmax()) == int(test.argmax()), diff, diff / ref.std().item()))
        token = int(ref.argmax())  # the unquantized engine's greedy token drives both
        position = len(prompt) + step
        logits = [r.last_logits([TokenChunk([token], position, table)])[0].float() for r in runners]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from punctual import LLM, SamplingParams
    from punctual.config import CacheConfig, ModelConfig
    from punctual.runner.runner import ModelRunner

    blocks = args.prompts * (-(-(args.prompt_len + args.max_tokens) // 16)) + 8
    model = ModelConfig(model=args.model, dtype=args.dtype)
    runners = [ModelRunner(model, CacheConfig(num_kv_blocks=blocks, kv_cache_dtype=kv), 1) for kv in ("auto", "int8")]
    engines = [LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv, num_kv_blocks=blocks, enable_prefix_caching=False)
               for kv in ("auto", "int8")]
    tokenizer = engines[0].tokenizer
    vocab = runners[0].arch.vocab_size
    print(f"model {args.model} ({args.dtype}); {args.prompts} prompts x {args.prompt_len} tokens, "
          f"{args.max_tokens} generated; int8 KV vs {args.dtype} KV")
    print(f"{'input':8} {'argmax agree':>12} {'max|dlogit| p50':>16} {'p99':>8} {'/std p50':>9} "
          f"{'free-run identical':>19} {'first diff (mean)':>18}")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for kind in ("random", "text", "repeat"):
        prompts = make_prompts(kind, args.prompts, args.prompt_len, vocab, tokenizer, args.seed)
        rows = [row for p in prompts for row in teacher_forced(runners, p, args.max_tokens)]
        agree = sum(r[0] for r in rows) / len(rows)
        diffs = sorted(r[1] for r in rows)
        rel = statistics.median(r[2] for r in rows)
        outs = [[o.outputs[0].token_ids for o in e.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)] for e in engines]
        same = sum(a == b for a, b in zip(*outs)) / len(prompts)
        firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(*outs)]
        print(f"{kind:8} {agree:12.1%} {statistics.median(diffs):16.4f} {diffs[int(0.99 * (len(diffs) - 1))]:8.4f} "
              f"{rel:9.4f} {same:19.0%} {statistics.mean(firsts):18.1f}")


if __name__ == "__main__":
    main()
