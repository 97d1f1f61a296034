"""Long-context decode: dense attention against Quest sparse decode attention at several token
budgets: decode TPOT at each context and stream count, passkey retrieval, and the perplexity of
text decoded one token at a time (teacher forced) after a long context.

    python benchmarks/bench_long_context.py                                   # ~3 min: 1 stream
    python benchmarks/bench_long_context.py --streams 1,16                    # the full table (longer)
    python benchmarks/bench_long_context.py --model builtin-tiny --contexts 256 --budgets 64 \
        --tokens 4 --passkey-contexts 256 --depths 50                          # a smoke run

One engine with --sparse-attention quest serves every variant, so each context is prefilled once
and found in the prefix cache after: the dense rows ask for `sparse_attention: false` per request
(the field a user compares with), and the budget is changed on the runner between rounds (the
engine flag --sparse-token-budget, set once per server, is what it stands for). The min context is
1 here, so every listed context is measured through the sparse path (a server's default, 2048,
keeps shorter contexts dense).

TPOT: prompts of real text (standard-library documentation, punctual.bench.corpus), a distinct
one per stream (no KV shared between streams), the core's per-request TPOT (ms, median over the
streams). Passkey: a number hidden at a depth of the context in a repeated English paragraph,
then the question; retrieved when the greedy answer contains it. Only decodes are sparse: the
answer's first token comes from the (dense) prompt pass, the others from sparse decodes.
Perplexity: the corpus text after --perplexity-contexts tokens, each next token fed as a decode
(the sampler swapped for one that returns the text's token and records its log-probability).

--peers llama.cpp adds, in the same run after the tables above (the in-process engine is freed
first), a comparison through each server's OpenAI-compatible API, measured the same way for both
(punctual.bench.loadgen: streamed /v1/completions with token-id prompts, max_tokens + ignore_eos):
Punctual dense (`punctual serve`, no sparse attention) against llama.cpp's llama-server reading the
checkpoint converted to GGUF (--llama-cpp-type, bf16 by default: the same weights and precision),
with -np = the most streams and -c = streams x the model's context, so every slot holds a whole
context. Each server runs alone, with --server-threads threads.
  decode TPOT: the same prompts as above, sent once with max_tokens 1 (Punctual's prefix cache and
    llama.cpp's slots then hold them), then again with --tokens: (end - first token) / (tokens - 1)
    per stream as the client sees it, median over the streams;
  TTFT: one request at a time, prompts of each context that share no prefix with anything sent
    before, the first streamed token; median of --ttft-trials after one warm-up request.

    python benchmarks/bench_long_context.py --streams 1,16 --peers llama.cpp   # everything (long)
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
from punctual.bench.machine import cpu_line

PARAGRAPH = ("The village sat at the edge of a wide valley, where the river turned slowly towards the sea. "
             "In the mornings the farmers walked to their fields along the old stone road, and in the "
             "evenings they gathered in the square to talk about the weather, the harvest and the news "
             "from the town beyond the hills. Nothing much changed from one year to the next. ")
QUESTION = "\nWhat is the pass key? The pass key is"




def text_prompts(tokenizer, count: int, length: int, start: int = 0) -> list[list[int]]:
    """`count` distinct prompts of `length` tokens of real prose, from token `start` of the corpus on."""
    from punctual.bench.corpus import documents

    end = start + length + count * 997
    ids: list[int] = []
    for doc in documents():
        ids += tokenizer.encode(doc)
        if len(ids) >= end:
            break
    while len(ids) < end:  # a small corpus: around again
        ids += ids
    return [ids[start + i * 997:start + i * 997 + length] for i in range(count)]  # shifted: distinct from the first block on


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tokenizer.encode(QUESTION)
    filler_ids = tokenizer.encode(PARAGRAPH * (length // 40 + 2))
    room = length - len(needle) - len(question)
    filler = filler_ids[:room]
    at = int(room * depth)
    return filler[:at] + needle + filler[at:] + question


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--contexts", default="1024,2048,4096,8192", help="prompt tokens, comma separated")
    parser.add_argument("--streams", default="1", help="concurrent streams, comma separated (e.g. 1,16)")
    parser.add_argument("--budgets", default="512,1024,2048", help="Quest token budgets, comma separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per stream for TPOT")
    parser.add_argument("--passkey-contexts", default="2048,4096", help="comma separated; empty: skip")
    parser.add_argument("--depths", default="10,30,50,70,90", help="passkey depths in percent")
    parser.add_argument("--passkey-trials", type=int, default=1, help="keys per context and depth")
    parser.add_argument("--perplexity-contexts", default="4096,8000",
                        help="perplexity of the next --perplexity-tokens after this many tokens of text, "
                             "comma separated; empty: skip")
    parser.add_argument("--perplexity-tokens", type=int, default=128,
                        help="tokens scored one decode at a time (teacher forced) after each context")
    parser.add_argument("--peers", default="", help="llama.cpp: also decode TPOT and TTFT through each server's "
                        "API, Punctual dense against llama-server, in the same run (see above)")
    parser.add_argument("--llama-cpp-type", default="bf16",
                        help="the GGUF llama.cpp serves: bf16 | f16 | f32 (converted from the checkpoint) | q4_0 ...")
    parser.add_argument("--ttft-trials", type=int, default=3, help="TTFT requests per context (median)")
    parser.add_argument("--server-threads", type=int, default=os.cpu_count() or 1,
                        help="compute threads of each server (--peers)")
    args = parser.parse_args()
    if args.peers and args.peers != "llama.cpp":
        parser.error(f"--peers: only llama.cpp is supported, got {args.peers!r}")
    if args.ttft_trials < 1:
        parser.error(f"--ttft-trials: must be at least 1, got {args.ttft_trials}")
    tokenizer = in_process(args)
    if args.peers:
        gc.collect()  # the in-process engine's weights and KV pool go before the servers start
        through_the_api(args, tokenizer)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def in_process(args: argparse.Namespace):
    """The tables through `LLM` (module docstring); returns the tokenizer, the engine freed."""
    contexts, streams, budgets = ints(args.contexts), ints(args.streams), ints(args.budgets)
    passkey_contexts, depths = ints(args.passkey_contexts), ints(args.depths)

    import torch

    from punctual import LLM, SamplingParams

    block_size = 16
    longest = max(contexts + passkey_contexts) + args.tokens + 64
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, block_size=block_size,
              max_model_len=longest, num_kv_blocks=(max(streams) + 2) * -(-longest // block_size) + 64,
              max_num_seqs=max(streams), max_num_batched_tokens=2048,
              sparse_attention="quest", sparse_token_budget=min(budgets), sparse_min_context=1)
    runner, tokenizer = llm.engine.core.runner, llm.get_tokenizer()
    variants = [("dense", None)] + [(f"quest {b}", b) for b in budgets]

    def run(prompts: list[list[int]], budget: int | None, max_tokens: int):
        if budget is not None:
            runner.sparse_budget_blocks = budget // block_size
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                sparse_attention=budget is not None)
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    print(f"{args.model} {args.dtype} quantization {args.quantization}, {torch.get_num_threads()} threads")
    print(cpu_line())
    print("\ndecode TPOT (ms, median over streams; x: dense / quest)")
    header = f"{'context':>8} {'streams':>7} " + " ".join(f"{name:>16}" for name, _ in variants)
    print(header)
    room = runner.max_model_len - args.tokens - 8  # a prompt plus its output fits the model's context
    for num_streams in streams:
        for context in (min(c, room) for c in contexts):
            prompts = text_prompts(tokenizer, num_streams, context)
            run(prompts, None, 1)  # prefill once: every variant below finds the prompts cached
            cells, dense_ms = [], None
            for name, budget in variants:
                outs = run(prompts, budget, args.tokens)
                ms = statistics.median(o.outputs[0].metrics["tpot_ms"] for o in outs)
                dense_ms = ms if budget is None else dense_ms
                cells.append(f"{ms:8.2f}" + ("" if budget is None else f" ({dense_ms / ms:4.2f}x)"))
            print(f"{context:>8} {num_streams:>7} " + " ".join(f"{c:>16}" for c in cells), flush=True)

    if passkey_contexts:
        print("\npasskey retrieval (retrieved / tried)")
        print(f"{'context':>8} " + " ".join(f"{name:>12}" for name, _ in variants))
        rng = random.Random(0)
        for context in (min(c, room) for c in passkey_contexts):
            found = {name: 0 for name, _ in variants}
            tried = 0
            for depth in depths:
                for _ in range(args.passkey_trials):
                    key = rng.randrange(10000, 100000)
                    prompt = passkey_prompt(tokenizer, context, depth / 100, key)
                    tried += 1
                    for name, budget in variants:
                        text = run([prompt], budget, 8)[0].outputs[0].text
                        found[name] += str(key) in text
            print(f"{context:>8} " + " ".join(f"{f'{found[name]}/{tried}':>12}" for name, _ in variants), flush=True)

    perplexity_contexts = ints(args.perplexity_contexts)
    if perplexity_contexts:
        # Quest applies to decodes only, so the text is scored one decode at a time: the sampler
        # is replaced by one that returns the text's next token and records its log-probability
        # under the step's logits (teacher forcing); dense and Quest see the same tokens.
        print(f"\nperplexity of {args.perplexity_tokens} tokens decoded one at a time after the context "
              "(x: quest / dense)")
        print(f"{'context':>8} " + " ".join(f"{name:>16}" for name, _ in variants))
        sampler = runner.sampler
        original = sampler.sample
        for context in (min(c, room - args.perplexity_tokens) for c in perplexity_contexts):
            text = text_prompts(tokenizer, 1, context + args.perplexity_tokens + 1)[0]
            prompt, target = text[:context], text[context:context + args.perplexity_tokens]
            cells, dense_ppl = [], None
            for name, budget in variants:
                nll: list[float] = []

                def forced(logits, states, nll=nll):
                    assert len(states) == 1, "one stream at a time"
                    position = len(nll)
                    token = target[min(position, len(target) - 1)]
                    nll.append(-torch.log_softmax(logits[0].float(), dim=-1)[token].item())
                    return [token], [None]

                sampler.sample = forced
                try:
                    run([prompt], budget, len(target))
                finally:
                    sampler.sample = original
                # The first scored token comes from the prompt's last position (a prefill): the
                # rest from decodes, where Quest acts.
                ppl = math.exp(statistics.fmean(nll[:len(target)]))
                dense_ppl = ppl if budget is None else dense_ppl
                cells.append(f"{ppl:8.3f}" + ("" if budget is None else f" ({ppl / dense_ppl:5.3f}x)"))
            print(f"{context:>8} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    return tokenizer


def kv_bytes_per_token(model: str) -> int:
    """K and V of one token over every layer, in bf16: what a server's KV pool needs per token."""
    import json

    from punctual.checkpoints.loader import resolve_model_path

    config = json.loads((resolve_model_path(model) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * kv_heads * head_dim * 2


def through_the_api(args: argparse.Namespace, tokenizer) -> None:
    """Punctual dense and llama.cpp, each as a server, measured the same way through the API."""
    import tempfile
    from pathlib import Path

    from punctual.bench.loadgen import run as send
    from punctual.bench.peers import PeerOptions, peer_spec, running
    from punctual.bench.workloads import BenchRequest
    from punctual.checkpoints.loader import resolve_model_path
    from punctual.models.registry import load_arch_config

    streams = ints(args.streams)
    most = max(streams)
    model_len = load_arch_config(resolve_model_path(args.model)).max_position_embeddings  # smollm2: 8192
    room = model_len - args.tokens - 8  # a prompt plus its output fits the model's context
    contexts = [min(c, room) for c in ints(args.contexts)]
    # Every stream may hold a whole context at once, plus the TTFT prompts in the prefix cache.
    kv_mib = -(-(most + 2) * model_len * kv_bytes_per_token(args.model) * 11 // 10 // 2**20)
    options = PeerOptions(max_num_seqs=most, threads=args.server_threads, kv_cache_memory=f"{kv_mib}MiB",
                          slot_context=model_len,
                          punctual_args=("--dtype", args.dtype, "--quantization", args.quantization,
                                         "--max-model-len", str(model_len)))
    # The same prompts for both systems, built once (the corpus is tokenized from its start each time).
    # TPOT prompts start at multiples of 997 tokens (at most 15 x 997 for 16 streams); TTFT prompts
    # start after those and each 997 tokens after the last (the corpus is about 62k smollm2 tokens),
    # so no TTFT prompt shares its first block with any other prompt: nothing is found cached.
    # One more than --ttft-trials per context, for a warm-up.
    tpot_prompts = {(n, c): text_prompts(tokenizer, n, c) for n in streams for c in contexts}
    first_ttft = max(streams) * 997 + 58
    ttft_prompts = {c: text_prompts(tokenizer, args.ttft_trials + 1, c, start=first_ttft + i * (args.ttft_trials + 1) * 997)
                    for i, c in enumerate(contexts)}
    systems = ["punctual", f"llama.cpp:{args.llama_cpp_type}"]
    logs = Path(tempfile.mkdtemp(prefix="long-context-peers-"))
    tpot: dict[tuple[str, int, int], float] = {}
    ttft: dict[tuple[str, int], float] = {}
    for system in systems:
        spec = peer_spec(system, args.model, options)
        print(f"\n{system}: starting ({' '.join(spec.command[:2])} ...; log {logs})", flush=True)
        with running(spec, logs / f"{system.replace(':', '-')}.log") as endpoint:
            def completions(prompts: list[list[int]], max_tokens: int, concurrency: int):
                requests = [BenchRequest(p, len(p), max_tokens) for p in prompts]
                records = send(endpoint, requests, concurrency=concurrency, progress=False, timeout_s=3600).records
                failed = [r.error for r in records if not r.ok]
                if failed:
                    raise SystemExit(f"{system}: {len(failed)} of {len(records)} requests failed: {failed[0]}")
                return records

            for num_streams in streams:
                for context in contexts:
                    prompts = tpot_prompts[num_streams, context]
                    completions(prompts, 1, num_streams)  # prefill once: the timed round finds them cached
                    records = completions(prompts, args.tokens, num_streams)
                    tpot[system, num_streams, context] = statistics.median(r.tpot_s for r in records) * 1e3
                    print(f"  TPOT {context:>5} tokens x {num_streams:>2} streams: "
                          f"{tpot[system, num_streams, context]:8.2f} ms", flush=True)
            for context in contexts:
                prompts = ttft_prompts[context]
                completions(prompts[:1], 1, 1)  # warm-up at this length
                records = [completions([p], 1, 1)[0] for p in prompts[1:]]
                ttft[system, context] = statistics.median(r.ttft_s for r in records) * 1e3
                print(f"  TTFT {context:>5} tokens: {ttft[system, context]:8.1f} ms", flush=True)

    print(f"\n{args.model} through the API ({args.dtype} quantization {args.quantization}; llama.cpp "
          f"{args.llama_cpp_type} GGUF), {args.server_threads} threads each, {args.tokens} tokens per stream")
    print(cpu_line())
    punctual, llama = systems
    print("\ndecode TPOT (ms, median over streams; x: llama.cpp / Punctual, above 1: Punctual faster)")
    print("| context | streams | Punctual dense | llama.cpp | x |")
    print("|---|---|---|---|---|")
    for num_streams in streams:
        for context in contexts:
            ours, theirs = tpot[punctual, num_streams, context], tpot[llama, num_streams, context]
            print(f"| {context} | {num_streams} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")
    print(f"\nTTFT (ms, one request at a time, median of {args.ttft_trials}; x: llama.cpp / Punctual)")
    print("| prompt tokens | Punctual | llama.cpp | x |")
    print("|---|---|---|---|")
    for context in contexts:
        ours, theirs = ttft[punctual, context], ttft[llama, context]
        print(f"| {context} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
