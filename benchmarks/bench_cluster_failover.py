"""A replica killed in the middle of a 32-stream load: requests lost, tokens duplicated or missing,
and the stall the resumed streams see.

Starts `punctual serve MODEL --replicas 2`, runs N concurrent greedy streams once undisturbed
(the reference texts and gaps), then again, SIGKILLing the busiest replica once every stream has
its first few tokens. A stream is "lost" if it ends with an error, "wrong" if its text differs
from the undisturbed one (a duplicated or missing token changes it). The stall is each stream's
longest gap between two chunks.

    python benchmarks/bench_cluster_failover.py --model builtin-tiny --streams 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def stream(client, url, prompt, max_tokens, progress) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started = time.monotonic()
    times, text, error = [], [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                break
            times.append(time.monotonic())
            text.append(event["choices"][0]["text"])
            progress[prompt] = len(times)
    gaps = np.diff([started] + times)
    return {"text": "".join(text), "error": error, "ttft": float(gaps[0]) if len(gaps) else None,
            "max_gap": float(gaps[1:].max()) if len(gaps) > 1 else 0.0,
            "tpot": float((times[-1] - times[0]) / max(1, len(times) - 1)) if times else None}


async def load(url, prompts, max_tokens, kill_after_tokens=None):
    progress: dict = {}
    killed = {}
    async with httpx.AsyncClient(timeout=600) as client:
        async def killer():
            while len(progress) < len(prompts) or min(progress.values()) < kill_after_tokens:
                await asyncio.sleep(0.005)
            replicas = (await client.get(f"{url}/admin/replicas")).json()
            victim = max(replicas, key=lambda r: r["running"] + r["waiting"])
            os.kill(victim["pid"], signal.SIGKILL)
            killed.update(victim, at=time.monotonic())

        tasks = [stream(client, url, p, max_tokens, progress) for p in prompts]
        if kill_after_tokens is not None:
            kill_task = asyncio.ensure_future(killer())
        results = await asyncio.gather(*tasks)
        if kill_after_tokens is not None:
            kill_task.cancel()
    return results, killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin-tiny")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kill-after-tokens", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="bench-failover-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "punctual.cli", "serve", args.model, "--port", str(port), "--served-model-name", "m",
         "--replicas", "2", "--kv-cache-memory", "64MiB", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        prompts = [f"stream {i}: the quick brown fox number {i} jumps" for i in range(args.streams)]
        reference, _ = asyncio.run(load(url, prompts, args.max_tokens))
        disturbed, killed = asyncio.run(load(url, prompts, args.max_tokens, args.kill_after_tokens))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    output = open(log.name).read()
    resumed = sum(int(n) for n in re.findall(r"resuming its (\d+) requests", output))
    lost = sum(r["error"] is not None for r in disturbed)
    wrong = sum(r["error"] is None and r["text"] != ref["text"] for r, ref in zip(disturbed, reference))
    stalls = sorted(r["max_gap"] for r in disturbed)
    affected = stalls[-resumed:] if resumed else []
    summary = {
        "streams": args.streams, "killed_replica": killed.get("id"), "requests_resumed": resumed,
        "requests_lost": lost, "streams_with_wrong_tokens": wrong,
        "undisturbed_max_gap_p50_s": round(float(np.median([r["max_gap"] for r in reference])), 3),
        "resumed_max_gap_p50_s": round(float(np.median(affected)), 3) if affected else None,
        "resumed_max_gap_max_s": round(float(max(affected)), 3) if affected else None,
        "undisturbed_tpot_p50_ms": round(1000 * float(np.median([r["tpot"] for r in reference])), 1),
        "disturbed_tpot_p50_ms": round(1000 * float(np.median([r["tpot"] for r in disturbed if r["tpot"]])), 1),
        "undisturbed_ttft_p50_ms": round(1000 * float(np.median([r["ttft"] for r in reference])), 1),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
