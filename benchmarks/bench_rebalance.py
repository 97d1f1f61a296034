"""Rebalancing by migration (`--migration on`) on a skewed load (issue 17).

Two replicas behind the round_robin router; requests alternate long (many output tokens) and
short, so every long stream lands on replica 0 and replica 1 goes idle once its short ones end.
With `--migration on` the front end moves running streams from the busy replica to the idle one.
Reports TPOT and end-to-end latency of the long streams, with migration off and on.

    python benchmarks/bench_rebalance.py --model builtin --pairs 6
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from punctual.bench.peers import PeerSpec, free_port, running

_spec = importlib.util.spec_from_file_location("bench_pd", Path(__file__).parent / "bench_pd.py")
bench_pd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_pd)

SETUPS = {"off": ["--migration", "off"], "on": ["--migration", "on", "--migration-threshold", "2"]}


async def burst(url: str, prompts: list[list[int]], lengths: list[int]) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.monotonic()
        tasks = []
        for prompt, length in zip(prompts, lengths):  # in order, so round_robin alternates
            tasks.append(asyncio.ensure_future(bench_pd.one_request(client, url, prompt, length)))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks)
        return results, time.monotonic() - started


def run_setup(args, name: str, prompts, lengths) -> dict:
    port = free_port()
    spec = PeerSpec("punctual", [
        sys.executable, "-m", "punctual.cli", "serve", args.model, "--port", str(port), "--served-model-name", "m",
        "--replicas", "2", "--threads-per-replica", "1", "--router", "round_robin", *SETUPS[name],
        "--log-level", "warning"], port)
    url = spec.base_url
    log = Path(tempfile.mkdtemp(prefix="bench-rebalance-")) / "server.log"
    with running(spec, log, startup_timeout_s=300):  # started, healthy, and stopped after
        results, wall = asyncio.run(burst(url, prompts, lengths))
        moves = httpx.get(f"{url}/admin/migrations").json()
    long = [r for r, n in zip(results, lengths) if n == args.long_tokens]
    tpot = np.array([r["tpot"] for r in long]) * 1000
    e2e = np.array([r["e2e"] for r in results])
    return {"migration": name, "wall_s": round(wall, 1),
            "long_tpot_p50_ms": round(float(np.percentile(tpot, 50)), 1),
            "long_tpot_p99_ms": round(float(np.percentile(tpot, 99)), 1),
            "e2e_p50_s": round(float(np.percentile(e2e, 50)), 2), "e2e_p99_s": round(float(np.percentile(e2e, 99)), 2),
            "migrations_ok": sum(m["ok"] for m in moves), "migrations_failed": sum(not m["ok"] for m in moves),
            "texts": [r["text"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=160)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--setups", default="off,on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(300, 2000, args.prompt_tokens).tolist() for _ in range(2 * args.pairs)]
    lengths = [args.long_tokens, args.short_tokens] * args.pairs
    rows = [run_setup(args, name, prompts, lengths) for name in args.setups.split(",")]
    first = rows[0]["texts"]
    for row in rows:
        row["texts_differing_from_first"] = sum(a != b for a, b in zip(row["texts"], first))
    for row in rows:
        row.pop("texts")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
