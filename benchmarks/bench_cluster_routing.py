"""Routers compared on a shared-prefix workload with more documents than one replica's KV pool holds.

For each router, start `punctual serve MODEL --replicas 2 --threads-per-replica 1 --router R`,
send the same seeded closed-loop workload (each request: one of D documents, uniform, plus a
question of its own), and report throughput, goodput (requests/s meeting the TTFT SLO), TTFT
percentiles, the replicas' prefix-cache hit rate, and each replica's share of the prompt tokens
computed. Then time the router's decision alone (in-process, no server): its added latency.

    python benchmarks/bench_cluster_routing.py --model builtin --documents 8 --requests 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from punctual.bench.peers import PeerSpec, free_port, running


def workload(documents: int, doc_tokens: int, question_tokens: int, requests: int, seed: int, zipf: float = 0.0):
    """Each request: a document (uniform, or Zipf(s)-popular with s > 0) and a question of its own."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(300, 2000, doc_tokens).tolist() for _ in range(documents)]
    popularity = 1.0 / np.arange(1, documents + 1) ** zipf
    picks = rng.choice(documents, size=requests, p=popularity / popularity.sum())
    return [docs[d] + rng.integers(300, 2000, question_tokens).tolist() for d in picks]


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    started = time.monotonic()
    first = None
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and first is None:
                first = time.monotonic()
    return {"ttft": first - started, "e2e": time.monotonic() - started}


async def closed_loop(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                      request=one_request) -> tuple[list[dict], float]:
    """`concurrency` clients, each sending the next prompt when its last answer ended; `request`
    (client, url, prompt, max_tokens) -> its record."""
    queue = list(enumerate(prompts))
    results: list[dict] = [None] * len(prompts)
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            while queue:
                index, prompt = queue.pop(0)
                results[index] = await request(client, url, prompt, max_tokens)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.monotonic() - started


def metric_by_replica(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}(?:_total)?{{replica="(\d+)"}} (\S+)$', text, re.MULTILINE)}


def run_router(args, router: str, prompts) -> dict:
    port = free_port()
    spec = PeerSpec("punctual", [
        sys.executable, "-m", "punctual.cli", "serve", args.model, "--port", str(port), "--served-model-name", "m",
        "--replicas", "2", "--threads-per-replica", "1", "--router", router,
        *[arg for option in args.router_option for arg in ("--router-option", option)],
        "--kv-cache-memory", args.kv_cache_memory, "--log-level", "warning"], port)
    url = spec.base_url
    log = Path(tempfile.mkdtemp(prefix="bench-routing-")) / "server.log"
    with running(spec, log, startup_timeout_s=300):  # started, healthy, and stopped after
        blocks = httpx.get(f"{url}/admin/replicas").json()[0]["kv_blocks_total"]
        results, wall = asyncio.run(closed_loop(url, prompts, args.concurrency, args.max_tokens))
        text = httpx.get(f"{url}/metrics").text
    ttft = np.array([r["ttft"] for r in results])
    hits, queries = metric_by_replica(text, "punctual_prefix_cache_hits"), metric_by_replica(text, "punctual_prefix_cache_queries")
    computed = metric_by_replica(text, "punctual_engine_prompt_tokens_computed")
    shares = [computed[k] / max(1.0, sum(computed.values())) for k in sorted(computed)]
    generated = metric_by_replica(text, "punctual_engine_generation_tokens")
    requests_share = [generated[k] / max(1.0, sum(generated.values())) for k in sorted(generated)]
    return {"router": router, "kv_blocks_per_replica": blocks, "requests": len(results), "wall_s": round(wall, 1),
            "throughput_rps": round(len(results) / wall, 3),
            "goodput_rps": round(float((ttft <= args.ttft_slo_s).sum()) / wall, 3),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
            "prefix_hit_rate": round(sum(hits.values()) / max(1.0, sum(queries.values())), 3),
            "prompt_token_share": [round(s, 3) for s in shares],
            "generated_token_share": [round(s, 3) for s in requests_share],
            "router_options": args.router_option}


def router_latency(args) -> dict:
    """The cache-aware decision alone: two replicas holding half the documents each."""
    from punctual.cluster.router import ReplicaLoad, make_router, prompt_block_hashes

    prompts = workload(args.documents, args.doc_tokens, args.question_tokens, 2000, args.seed + 1)
    out = {}
    for name in ("cache_aware", "least_loaded", "round_robin"):
        router = make_router(name, 16)
        for i, prompt in enumerate(prompts[:args.documents * 4]):
            router.on_blocks_stored(i % 2, prompt_block_hashes(prompt, 16))
        loads = [ReplicaLoad(i, True, 2, 1, 300, 100, 182) for i in range(2)]
        times = []
        for prompt in prompts:
            started = time.perf_counter()
            rid = router.route(prompt, None, loads)
            router.on_request_routed(rid, len(prompt))
            times.append(time.perf_counter() - started)
        times = np.array(times) * 1e6
        out[name] = {"p50_us": round(float(np.percentile(times, 50)), 1),
                     "p99_us": round(float(np.percentile(times, 99)), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kv-cache-memory", default="64MiB", help="per replica: fewer blocks than all documents need")
    parser.add_argument("--ttft-slo-s", type=float, default=1.0, help="goodput counts requests within this TTFT")
    parser.add_argument("--routers", default="cache_aware,round_robin,least_loaded")
    parser.add_argument("--zipf", type=float, default=0.0, help="document popularity Zipf(s); 0: uniform")
    parser.add_argument("--router-option", action="append", default=[], help="passed to punctual serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    prompts = workload(args.documents, args.doc_tokens, args.question_tokens, args.requests, args.seed, args.zipf)
    results = {"args": vars(args), "routers": [], "router_latency": router_latency(args)}
    print(json.dumps(results["router_latency"]), flush=True)
    for router in args.routers.split(","):
        results["routers"].append(run_router(args, router, prompts))
        print(json.dumps(results["routers"][-1]), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
