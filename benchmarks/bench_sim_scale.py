"""How long `punctual sim run` takes on a big cluster with the default (cache-aware) router and
with least-loaded (issue 33: 100,000 requests over 100 replicas within 60 s, 1,000,000 over
1,000 within 10 minutes, on 2 cores).

Each case runs the CLI a user would run, in a subprocess, and prints its wall time and the
simulator's own line (events, steps, CPU). The profile is a roofline estimate of llama-3-8b on
an H100 (`punctual sim calibrate llama-3-8b --hardware h100`) unless --profile names one.

    python benchmarks/bench_sim_scale.py                      # 100k / 100 replicas, both routers
    python benchmarks/bench_sim_scale.py --million            # and 1M / 1,000 replicas
    python benchmarks/bench_sim_scale.py --exact              # each case also planned step by step
    python benchmarks/bench_sim_scale.py --scale 0.02         # a smoke run (2,000 requests, 2 replicas)
    python benchmarks/bench_sim_scale.py --sim-processes 1    # the exact router in one process
    python benchmarks/bench_sim_scale.py --against-one-process --repeats 2
                                    # each case, then the same in one process, back to back: a ratio
                                    # that a shared machine's drift between cases does not move

With the CLI's defaults (`--sim-processes auto`: one process per CPU from 32 replicas on) the
routers that read replica state decide on state up to `--sim-staleness-ms` (10) late
(punctual/sim/stale.py); --sim-processes 1 times the one-process exact router.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from punctual.bench.machine import cpu_line




def run_case(profile: str, replicas: int, requests: int, rate: float, router: str,
             exact: bool, processes: str | None = None) -> tuple[float, str, str]:
    # No --output: the command writes no JSON (an indented JSON of a 100k-request run
    # takes pure-Python encoding time that is not the simulator's).
    command = [sys.executable, "-m", "punctual.cli", "sim", "run", "--profile", profile, "--replicas", str(replicas),
               "--num-requests", str(requests), "--request-rate", f"{rate:g}", "--router", router, "--no-progress"] + (["--plan-every-step"] if exact else []) + \
              (["--sim-processes", processes] if processes else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    text = done.stdout + done.stderr
    simulated = next((line for line in text.splitlines() if line.startswith("simulated")), "")
    summary = next((line for line in text.splitlines() if line.startswith("sim ")), "")
    split = next((line for line in text.splitlines() if " processes: " in line), "")
    simulated += f" [{split}]" if split else ""
    return wall, simulated, summary + " | " + " ".join(command[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="step-cost profile (default: an H100 roofline estimate)")
    parser.add_argument("--routers", default="cache_aware,least_loaded")
    parser.add_argument("--million", action="store_true", help="also 1,000,000 requests over 1,000 replicas")
    parser.add_argument("--exact", action="store_true", help="also run each case with --plan-every-step")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink requests, replicas and rate (smoke runs)")
    parser.add_argument("--sim-processes", default=None, help="passed to sim run (default: its own, auto)")
    parser.add_argument("--against-one-process", action="store_true",
                        help="run each case again with --sim-processes 1 right after it, and print the ratio")
    parser.add_argument("--repeats", type=int, default=1, help="times each case (and its pair) runs, in turn")
    args = parser.parse_args()
    out_dir = tempfile.mkdtemp(prefix="bench_sim_scale_")
    profile = args.profile
    if profile is None:
        profile = os.path.join(out_dir, "h100.json")
        subprocess.run([sys.executable, "-m", "punctual.cli", "sim", "calibrate", "llama-3-8b", "--hardware", "h100",
                        "--output", profile], check=True, capture_output=True)
    cases = [(100, 100_000, 200.0)] + ([(1000, 1_000_000, 2000.0)] if args.million else [])
    rows, pairs = [], []
    for replicas, requests, rate in cases:
        replicas = max(1, round(replicas * args.scale))
        requests = max(1, round(requests * args.scale))
        rate = rate * args.scale
        for router in [r.strip() for r in args.routers.split(",") if r.strip()]:
            for exact in ([False, True] if args.exact else [False]):
                for _ in range(args.repeats):
                    wall, simulated, detail = run_case(profile, replicas, requests, rate, router, exact,
                                                       args.sim_processes)
                    rows.append((f"{requests:,} / {replicas:,}", router, "every step" if exact else "runs", wall,
                                 simulated, detail))
                    print(f"# {detail}\n#   {simulated}", file=sys.stderr, flush=True)
                    if args.against_one_process:
                        one, simulated, detail = run_case(profile, replicas, requests, rate, router, exact, "1")
                        rows.append((f"{requests:,} / {replicas:,}", router, "one process", one, simulated, detail))
                        print(f"# {detail}\n#   {simulated}\n#   one process / as given: {one / wall:.2f}x",
                              file=sys.stderr, flush=True)
                        pairs.append((router, wall, one))
    print(f"CPU: {cpu_line()}")
    print(f"{'requests / replicas':<22} {'router':<13} {'planning':<11} {'wall s':>8}  simulator")
    for size, router, mode, wall, simulated, _ in rows:
        stats = re.sub(r"^simulated ", "", simulated)
        print(f"{size:<22} {router:<13} {mode:<11} {wall:>8.1f}  {stats}")
    for router, wall, one in pairs:
        print(f"{router}: {wall:.1f} s as given, {one:.1f} s in one process right after: {one / wall:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
