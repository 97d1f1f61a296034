"""Prefill speed through each server's API: distinct N-token prompts, one output token, one at a time.

Each system is started in turn (`punctual.bench.peers`, the same settings as `punctual bench
compare`), warmed up with two prompts, then sent `--prompts` distinct prompts of `--prompt-len`
random token ids (no prefix cache can help) asking for one token; prefill tok/s = prompt length /
request latency (so it includes HTTP and sampling one token, for every system alike).

    python benchmarks/bench_prefill_peers.py --model smollm2 --systems punctual,punctual:eager,llama.cpp
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx


def one_request(client: httpx.Client, base_url: str, style: str, prompt: list[int], model: str = "") -> float:
    start = time.perf_counter()
    if style == "llama.cpp":
        response = client.post(f"{base_url}/completion", json={"prompt": prompt, "n_predict": 1, "cache_prompt": False})
    else:
        response = client.post(f"{base_url}/v1/completions",
                               json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    response.raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--systems", default="punctual,llama.cpp")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from punctual.bench.peers import PeerOptions, peer_spec, running
    from punctual.checkpoints.loader import resolve_model_path
    from punctual.models.registry import load_arch_config

    vocab = load_arch_config(resolve_model_path(args.model)).vocab_size
    rng = random.Random(0)
    options = PeerOptions(max_num_seqs=4, threads=args.threads, slot_context=2 * args.prompt_len)
    rows = []
    logs = Path(tempfile.mkdtemp(prefix="prefill-peers-"))
    for system in args.systems.split(","):
        spec = peer_spec(system, args.model, options)
        with running(spec, logs / f"{system.replace(':', '-')}.log") as endpoint, \
                httpx.Client(trust_env=False, timeout=600) as client:
            model = ""
            if endpoint.style != "llama.cpp":
                model = client.get(f"{endpoint.base_url}/v1/models").json()["data"][0]["id"]
            prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(args.prompts + 2)]
            for prompt in prompts[:2]:
                one_request(client, endpoint.base_url, endpoint.style, prompt, model)
            latencies = [one_request(client, endpoint.base_url, endpoint.style, p, model) for p in prompts[2:]]
        rows.append((system, statistics.median(latencies), min(latencies)))
        print(f"{system}: median {statistics.median(latencies) * 1e3:.0f} ms", flush=True)
    base = rows[0][1]
    print(f"\n{args.model}, {args.prompts} distinct {args.prompt_len}-token prompts, 1 output token, "
          f"{args.threads} threads each, one request at a time")
    print("| system | latency p50 (ms) | prefill tok/s (p50) | best | vs first |")
    print("|---|---|---|---|---|")
    for system, median, best in rows:
        print(f"| {system} | {median * 1e3:.0f} | {args.prompt_len / median:.0f} | {args.prompt_len / best:.0f} | "
              f"{base / median:.2f}x |")


if __name__ == "__main__":
    main()
