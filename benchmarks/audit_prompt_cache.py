"""The prompt-caching audit of "Auditing Prompt Caching in Language Model APIs" against Punctual.

An attacker (tenant B) wants to know whether someone (tenant A) sent a prompt. It sends the
same prompt and a fresh one, and compares their time to first token: if the first is faster,
the prompt was cached, so somebody sent it. Over many pairs, a two-sample Kolmogorov-Smirnov
test tells the two distributions apart, or not.

For each mode of --prefix-cache-isolation (none, api-key) this starts `punctual serve` with two
keys of two tenants and, for each of --pairs fresh prompts P_i:
    A sends P_i                          (the victim; P_i is now cached for whoever may share it)
    A sends P_i again  -> "same tenant"  (a hit in both modes: the test must detect it: power)
    B sends P_i        -> "cross tenant" (a hit without isolation; a miss with it)
    B sends a fresh Q_i -> "miss"         (the baseline)
and prints the KS statistic and p-value of "same tenant" and "cross tenant" against "miss", plus
the mean cached_tokens each group was told in its usage. TTFT is the server's own
(usage.server_ttft_ms: HTTP arrival to the first token), so the client's network adds nothing.

    python benchmarks/audit_prompt_cache.py [--model builtin] [--pairs 50] [--prompt-tokens 512]

Timing on a shared machine is noisy; the deterministic equivalent (cached_tokens across
tenants) is asserted in tests/server/test_cache_isolation_api.py.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEYS = {"key-victim": "victim", "key-attacker": "attacker"}


def ks_two_sample(first: list[float], second: list[float]) -> tuple[float, float]:
    """The two-sample KS statistic D = sup |F1 - F2| and its asymptotic p-value (the Kolmogorov
    distribution with Stephens' small-sample correction, as in Numerical Recipes' kstwo)."""
    a, b = sorted(first), sorted(second)
    n, m = len(a), len(b)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        x = min(a[i], b[j])
        while i < n and a[i] == x:
            i += 1
        while j < m and b[j] == x:
            j += 1
        d = max(d, abs(i / n - j / m))
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model: str, isolation: str, key_file: Path, extra: list[str]):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tempfile.NamedTemporaryFile(prefix="punctual-audit-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "punctual.cli", "serve", model, "--port", self.url.rsplit(":", 1)[1],
             "--api-key-file", str(key_file), "--prefix-cache-isolation", isolation, "--log-level", "warning",
             *extra], stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become healthy in 300 s")

    def complete(self, key: str, prompt: list[int]) -> tuple[float, int]:
        """(server TTFT in ms, cached prompt tokens) of a one-token completion."""
        response = httpx.post(f"{self.url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=120)
        response.raise_for_status()
        usage = response.json()["usage"]
        return usage["server_ttft_ms"], usage["prompt_tokens_details"]["cached_tokens"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def audit(server: Server, pairs: int, prompt_tokens: int, rng: random.Random) -> dict[str, list[tuple[float, int]]]:
    def fresh() -> list[int]:
        return [rng.randrange(100, 2000) for _ in range(prompt_tokens)]

    groups: dict[str, list[tuple[float, int]]] = {"same tenant": [], "cross tenant": [], "miss": []}
    server.complete("key-victim", fresh())  # warm-up, untimed
    for _ in range(pairs):
        prompt = fresh()
        server.complete("key-victim", prompt)
        groups["same tenant"].append(server.complete("key-victim", prompt))
        groups["cross tenant"].append(server.complete("key-attacker", prompt))
        groups["miss"].append(server.complete("key-attacker", fresh()))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `punctual serve` argument")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "keys.txt"
        key_file.write_text("".join(f"{key} {tenant}\n" for key, tenant in KEYS.items()))
        for isolation in ("none", "api-key"):
            server = Server(args.model, isolation, key_file, args.serve_arg)
            try:
                groups = audit(server, args.pairs, args.prompt_tokens, random.Random(args.seed))
            finally:
                server.stop()
            miss = [ttft for ttft, _ in groups["miss"]]
            print(f"--prefix-cache-isolation {isolation}: {args.model}, {args.pairs} pairs, "
                  f"{args.prompt_tokens}-token prompts")
            for name, samples in groups.items():
                ttfts = sorted(ttft for ttft, _ in samples)
                line = (f"  {name:12s} TTFT median {ttfts[len(ttfts) // 2]:8.2f} ms, "
                        f"mean cached_tokens {sum(c for _, c in samples) / len(samples):7.1f}")
                if name != "miss":
                    d, p = ks_two_sample(ttfts, miss)
                    verdict = "distinguishable from a miss" if p < 0.05 else "indistinguishable from a miss"
                    line += f"; KS vs miss D={d:.3f} p={p:.3g} ({verdict} at 0.05)"
                print(line, flush=True)


if __name__ == "__main__":
    main()
