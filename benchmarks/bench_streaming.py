"""StreamingLLM perplexity: attention sinks + a window against a plain window and dense attention.

One long English text (the standard-library documentation of punctual.bench.corpus, concatenated:
shipped with Python, not downloaded) is scored token by token through Punctual's engine
(prompt logprobs), as the StreamingLLM paper evaluates: each token's logprob given what the KV
cache holds when it is computed.

    sinks   --attention-sinks 4 --streaming-window 2044: the first block and the recent window
    window  --attention-sinks 0 --streaming-window 2048: a plain window of the same size
    dense   every earlier token, up to the model's context (the text is cut there)

The table gives each variant's perplexity per segment of the text; the paper's result is that
sinks stay flat past the window, where the plain window rises once the first tokens are gone.

    python benchmarks/bench_streaming.py                   # smollm2, 4,096 tokens (a few minutes)
    python benchmarks/bench_streaming.py --tokens 32768    # the paper's setting (much longer)
    python benchmarks/bench_streaming.py --model builtin-tiny --tokens 300 --sinks 4 --window 60 \\
        --block-size 4 --segment 100                       # a check that it runs, not a figure

Once a streamed prompt's KV is full, it advances a block per step (each token sees at least the
window before it); before that, and for dense, in chunks of --max-num-batched-tokens.
"""
from __future__ import annotations

import argparse
import math
import time
from punctual.bench.machine import cpu_line




def long_text(tokenizer, num_tokens: int) -> list[int]:
    from punctual.bench.corpus import documents

    ids: list[int] = []
    for text in documents():
        ids.extend(tokenizer.encode(text))
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise SystemExit(f"the corpus holds only {len(ids)} tokens; ask for fewer --tokens")


def token_logprobs(model: str, tokens: list[int], **engine_kwargs) -> tuple[list[float], float]:
    """Each token's logprob given the ones before it (as the cache holds them), and the seconds taken."""
    from punctual import LLM, SamplingParams

    llm = LLM(model, enable_prefix_caching=False, **engine_kwargs)
    started = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": tokens}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    seconds = time.perf_counter() - started
    return [entry.logprob for entry in out.prompt_logprobs[1:]], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096, help="length of the text (32768: the paper's setting)")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=2044, help="the plain window keeps sinks + window tokens")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--segment", type=int, default=1024, help="tokens per column of the table")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    from punctual.checkpoints.loader import resolve_model_path
    from punctual.models.registry import load_arch_config
    from punctual.tokenizer import load_tokenizer

    path = resolve_model_path(args.model)
    context = load_arch_config(path).max_positions
    tokens = long_text(load_tokenizer(path), args.tokens)
    common = dict(block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
                  max_num_seqs=1)
    variants = {
        f"sinks {args.sinks}+{args.window}": dict(attention_sinks=args.sinks, streaming_window=args.window),
        f"window {args.sinks + args.window}": dict(attention_sinks=0, streaming_window=args.sinks + args.window),
    }
    print(f"{args.model} on {cpu_line()}")
    print(f"{len(tokens)} tokens of standard-library documentation; dense up to the context ({context})")
    results = {}
    for name, kwargs in variants.items():
        results[name] = token_logprobs(args.model, tokens, **common, **kwargs)
    results[f"dense (<= {context})"] = token_logprobs(args.model, tokens[:context - 1], **common)
    starts = list(range(0, len(tokens) - 1, args.segment))
    header = "".join(f"{f'{s // 1000}k-' if s >= 1000 else f'{s}-':>9s}" for s in starts)
    print(f"{'perplexity':24s}{header}{'all':>9s}{'seconds':>9s}")
    for name, (logprobs, seconds) in results.items():
        cells = []
        for start in starts:
            part = logprobs[start:start + args.segment]
            cells.append(f"{math.exp(-sum(part) / len(part)):9.2f}" if part else f"{'-':>9s}")
        print(f"{name:24s}{''.join(cells)}{math.exp(-sum(logprobs) / len(logprobs)):9.2f}{seconds:9.1f}")


if __name__ == "__main__":
    main()
