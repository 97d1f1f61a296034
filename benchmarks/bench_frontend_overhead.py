"""Front-end overhead of the OpenAI server: what HTTP, tokenizing, IPC and detokenizing add to TTFT.

For each streamed request, overhead = (client-observed TTFT) - (the engine's own TTFT), where the
engine's TTFT runs from the front end handing the request to the core's socket to the step that
sampled its first token (the server reports it in the final chunk's `usage.engine_ttft_ms`).
Waiting for the running step to end and queueing in the scheduler count as engine time, so the
overhead is the front end's cost alone: the HTTP round trip, JSON, validation, tokenizing,
the hop back from the core, detokenizing and SSE.
`in-server` is the same without the client and the network: the server's own HTTP-arrival to
first-token time (`usage.server_ttft_ms`) minus the engine's TTFT.

The client runs on the same machine, so at high concurrency its own Python time is included.

    python benchmarks/bench_frontend_overhead.py                       # builtin, 1 and 64 streams
    python benchmarks/bench_frontend_overhead.py --model builtin-tiny --requests 16
    python benchmarks/bench_frontend_overhead.py --url http://127.0.0.1:8000   # a running server
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from punctual.bench.sse import SSEDecoder

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact").split()


@dataclass
class Sample:
    client_ttft_ms: float
    engine_ttft_ms: float
    server_ttft_ms: float

    @property
    def overhead_ms(self) -> float:
        return self.client_ttft_ms - self.engine_ttft_ms

    @property
    def in_server_overhead_ms(self) -> float:
        return self.server_ttft_ms - self.engine_ttft_ms


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, extra_args: list[str], timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "punctual.cli", "serve", model, "--port", str(port),
               "--log-level", "warning", *extra_args]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"server not healthy within {timeout_s} s")


def prompt_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    # logprobs=0 makes every token visible at once, even one that decodes to no text yet (a random
    # model may emit a run of partial UTF-8 byte tokens); its small cost counts as overhead.
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    decoder = SSEDecoder()
    first_token_at = None
    usage = None
    sent_at = time.monotonic()
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for raw in response.aiter_raw():
            now = time.monotonic()
            for event in decoder.feed(raw):
                if event == "[DONE]":
                    continue
                chunk = json.loads(event)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if first_token_at is None and any(c["logprobs"] and c["logprobs"]["tokens"]
                                                  for c in chunk["choices"]):
                    first_token_at = now
                usage = chunk.get("usage") or usage
    if first_token_at is None or usage is None or "engine_ttft_ms" not in usage:
        raise RuntimeError(f"the stream had no token or no usage with engine_ttft_ms (usage: {usage})")
    return Sample((first_token_at - sent_at) * 1000, usage["engine_ttft_ms"], usage["server_ttft_ms"])


async def run_level(url: str, model: str, concurrency: int, num_requests: int, prompt_words: int,
                    max_tokens: int, seed: int) -> list[Sample]:
    """`concurrency` streams open at once, each sending requests back to back until all are done."""
    rng = random.Random(seed)
    prompts = [prompt_text(rng, prompt_words) for _ in range(num_requests)]
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def worker() -> None:
            while prompts:
                samples.append(await one_request(http, url, model, prompts.pop(), max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--url", default=None, help="measure a server that is already running")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated stream counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="", help="extra flags for `punctual serve`, one string")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        process, url = start_server(args.model, args.server_args.split(), args.start_timeout)
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    results = []
    try:
        asyncio.run(run_level(url, model, 1, 4, args.prompt_words, args.max_tokens, args.seed + 1))  # warm up
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            samples = asyncio.run(run_level(url, model, concurrency, max(args.requests, concurrency),
                                            args.prompt_words, args.max_tokens, args.seed))
            overhead = [s.overhead_ms for s in samples]
            in_server = [s.in_server_overhead_ms for s in samples]
            results.append({
                "concurrency": concurrency, "requests": len(samples),
                "client_ttft_p50_ms": statistics.median(s.client_ttft_ms for s in samples),
                "engine_ttft_p50_ms": statistics.median(s.engine_ttft_ms for s in samples),
                "overhead_p50_ms": statistics.median(overhead), "overhead_p90_ms": percentile(overhead, 90),
                "in_server_p50_ms": statistics.median(in_server), "in_server_p90_ms": percentile(in_server, 90)})
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)

    print(f"\nFront-end overhead on TTFT, model {model}, prompt ~{args.prompt_words} words, "
          f"{args.max_tokens} output tokens (ms)")
    header = ("streams", "requests", "client TTFT p50", "engine TTFT p50", "overhead p50", "overhead p90",
              "in-server p50", "in-server p90")
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for r in results:
        cells = (r["concurrency"], r["requests"], r["client_ttft_p50_ms"], r["engine_ttft_p50_ms"],
                 r["overhead_p50_ms"], r["overhead_p90_ms"], r["in_server_p50_ms"], r["in_server_p90_ms"])
        print(" | ".join(f"{c:>{len(h)}.2f}" if isinstance(c, float) else f"{c:>{len(h)}}"
                         for c, h in zip(cells, header)))
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
