"""`punctual sim validate`: the same bench plan against a real `punctual serve` here and against
the simulator with a profile of this machine; prints the simulator's errors per point.

Both sides get the same engine flags (the server on its command line, the simulator through
the same `cluster_config`), the same requests (the bench's seeds and salts) and the same
warm-ups; only the model runner differs. The profile should come from `calibrate --server` on
this machine (its front-end delays and serving-loop cost; its requests use other salts).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from punctual.bench.report import table

POINTS = (("TTFT p50", "ttft_ms", "median"), ("TTFT p90", "ttft_ms", "p90"),
          ("TPOT p50", "tpot_ms", "median"), ("TPOT p90", "tpot_ms", "p90"))


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    from punctual.bench.cli import add_load_args

    parser = argparse.ArgumentParser()
    add_load_args(parser)
    return parser.parse_args(["--workload", args.workload, "--sweep-rates", args.sweep_rates,
                              "--num-requests", str(args.num_requests), "--seed", str(args.seed),
                              "--length-scale", str(args.length_scale), "--ttft-slo-ms", str(args.ttft_slo_ms),
                              "--tpot-slo-ms", str(args.tpot_slo_ms), "--no-progress"])


def engine_flags(args: argparse.Namespace, profile) -> argparse.Namespace:
    """Flags both sides run with: the serve args given, else the calibrated engine's."""
    from punctual.cli import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    flags = parser.parse_args(shlex.split(args.serve_args))
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory"):
        if getattr(flags, name) is None and name in profile.engine:
            setattr(flags, name, profile.engine[name])
    flags.num_kv_blocks = profile.num_kv_blocks if flags.kv_cache_memory is None else None
    flags.replicas, flags.router = 1, "round_robin"
    return flags


def serve_command(flags: argparse.Namespace) -> list[str]:
    out = []
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory", "scheduling_policy"):
        value = getattr(flags, name, None)
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def errors(real_runs: list[dict], sim_runs: list[dict]) -> list[dict]:
    rows = []
    points = [(r["workload"], r["rate"]) for r in real_runs]
    if points != [(s["workload"], s["rate"]) for s in sim_runs]:  # --measured from another plan
        raise ValueError(f"the measured runs {points} are not the simulated plan's "
                         f"{[(s['workload'], s['rate']) for s in sim_runs]} (--workload, --sweep-rates)")
    for real, sim in zip(real_runs, sim_runs):
        for label, key, stat in POINTS:
            measured = (real["summary"][key] or {}).get(stat)
            simulated = (sim["summary"][key] or {}).get(stat)
            error = None if not measured or simulated is None else (simulated - measured) / measured
            rows.append({"workload": real["workload"], "rate": real["rate"], "metric": label,
                         "measured_ms": measured, "simulated_ms": simulated, "error": error})
    return rows


def validate(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    from punctual.bench.cli import plan_from_args
    from punctual.bench.loadgen import Endpoint
    from punctual.bench.sweep import bench_endpoint, goodputs
    from punctual.sim.cli import cluster_config
    from punctual.sim.engine import Simulator
    from punctual.sim.loadgen import SimSender
    from punctual.sim.profile import load_profile

    profile = load_profile(args.profile)
    server = profile.fit.get("server")
    if server is None:
        log("note: this profile has no serving-path terms (front end, serving loop); "
            "`punctual sim calibrate --server` measures them, and without them the simulator runs early")
    else:
        log(f"profile: front end admit {profile.admit_s * 1000:.1f} ms, deliver {profile.deliver_s * 1000:.1f} ms; "
            f"serving loop {server['scale']:.2f} x offline + {server['overhead_s'] * 1000:.1f} ms per step + "
            f"{server.get('prefill_step_s', 0.0) * 1000:.1f} ms per step with prompt tokens")
    plan = plan_from_args(bench_args(args))
    flags = engine_flags(args, profile)
    simulator = Simulator(cluster_config(flags, profile, plan.slo), profile)
    sim_runs = bench_endpoint(Endpoint("sim://"), plan, system="sim", progress=False, log=log,
                              send=SimSender(simulator, slo=plan.slo))
    if args.measured:  # the real side from an earlier run: only the simulator runs (any machine)
        real_runs = json.loads(Path(args.measured).read_text())["measured"]
        log(f"measured runs from {args.measured}")
    else:
        real_runs = measure(args, flags, plan, profile, log)
    rows = errors(real_runs, sim_runs)
    print(table(["workload", "rate", "metric", "measured", "simulated", "error"],
                [[r["workload"], f"{r['rate']:g}", r["metric"], _ms(r["measured_ms"]), _ms(r["simulated_ms"]),
                  "-" if r["error"] is None else f"{r['error']:+.0%}"] for r in rows]))
    valid = [abs(r["error"]) for r in rows if r["error"] is not None]
    good_real, good_sim = goodputs(real_runs, plan.target), goodputs(sim_runs, plan.target)
    print(f"\n|error| median {statistics.median(valid):.0%}, worst {max(valid):.0%} over {len(valid)} points")
    rates = sorted(plan.rates)
    for workload in plan.workloads:
        real_g = good_real.get("punctual", {}).get(workload, {}).get("goodput")
        sim_g = good_sim.get("sim", {}).get(workload, {}).get("goodput")
        steps = abs(_index(rates, real_g) - _index(rates, sim_g))
        print(f"goodput {workload}: measured {real_g}, simulated {sim_g} req/s "
              f"({'equal' if steps == 0 else f'{steps} sweep step(s) apart'})")
    if args.output:
        Path(args.output).write_text(json.dumps({"errors": rows, "measured": real_runs, "simulated": sim_runs,
                                                 "goodput": {"measured": good_real, "simulated": good_sim}},
                                                indent=1, default=str))
    return 0


def measure(args: argparse.Namespace, flags: argparse.Namespace, plan, profile,
            log: Callable[[str], None]) -> list[dict]:
    """The bench plan against a real `punctual serve` started here with the same engine flags."""
    from punctual.bench.peers import PeerOptions, free_port, punctual_peer, running
    from punctual.bench.sweep import bench_endpoint

    extra = tuple(serve_command(flags)) + tuple(a for a in shlex.split(args.serve_args))
    options = PeerOptions(max_num_seqs=flags.max_num_seqs or 32, punctual_args=extra)
    spec = punctual_peer(args.model, free_port(), options)
    log(f"starting {shlex.join(spec.command)}")
    log_path = Path(tempfile.mkdtemp(prefix="punctual-validate-")) / "server.log"
    if args.server_trace:  # the core's own record of the real runs (`punctual.sim.trace`)
        from punctual.sim.trace import TRACE_ENV

        Path(args.server_trace).unlink(missing_ok=True)
        spec = dataclasses.replace(spec, env={**spec.env, TRACE_ENV: args.server_trace})
    with running(spec, log_path, args.startup_timeout) as endpoint:
        real_runs = bench_endpoint(endpoint, plan, system="punctual", progress=False, log=log)
        if args.server_trace:
            time.sleep(0.5)  # the core writes its trace when it goes idle
    if args.server_trace:
        first_token_paths(args.server_trace, real_runs, profile, log)
    return real_runs


def first_token_paths(trace_path: str, real_runs: list[dict], profile, log: Callable[[str], None] = print) -> None:
    """Each measured record gets "server": where its TTFT went (`trace.first_token_path`), with
    the profile's cost of that first step beside the traced one ("predicted_step_s"); per run,
    the medians, and over all runs the fit of the delivery delay against the streams in the
    first token's step (does the front end slow down with the streams it serves?)."""
    import numpy as np

    from punctual.sim.trace import first_token_path, match_records, read_trace

    trace = read_trace(trace_path)
    cursor, streams, delivers = 0, [], []
    for run in real_runs:
        records = run.get("records") or []
        matched, cursor = match_records(trace.adds, records, cursor)
        paths = []
        for record, add in zip(records, matched):
            path = None if add is None else first_token_path(trace, add, record.get("ttft_s"))
            if path is not None:
                path["predicted_step_s"] = profile.predict(tuple(path["step"]))
            record["server"] = path
            if path is not None and path["deliver_s"] is not None:
                paths.append(path)
                streams.append(path["streams"])
                delivers.append(path["deliver_s"])
        if paths:
            part = {k: statistics.median(p[k] for p in paths) * 1000
                    for k in ("admit_s", "queued_s", "first_step_s", "predicted_step_s", "deliver_s")}
            log(f"server trace, {run['workload']} {run['rate']:g} req/s ({len(paths)}/{len(records)} matched): "
                "TTFT medians " + ", ".join(f"{k[:-2]} {v:.1f} ms" for k, v in part.items()))
    if len(set(streams)) > 1:
        x = np.stack([np.ones(len(streams)), np.asarray(streams, dtype=float)], axis=1)
        (fixed, per_stream), *_ = np.linalg.lstsq(x, np.asarray(delivers), rcond=None)
        log(f"server trace: deliver = {fixed * 1000:.2f} ms + {per_stream * 1000:.3f} ms x streams in the first "
            f"token's step ({len(streams)} requests, {min(streams):g}-{max(streams):g} streams)")


def _index(rates: list[float], goodput: float | None) -> int:
    return -1 if goodput is None else rates.index(goodput)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"
