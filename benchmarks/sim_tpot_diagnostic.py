"""Why the simulator's TPOT differs from a real server's: per point, the steps a decoding request
went through on each side (`punctual.sim.diagnose`), from a `sim validate` run's measurements and
the server's step trace, against the simulator re-run on the same plan with every step logged.

    punctual sim validate --profile P.json --workload chat --sweep-rates 2,4,8 --num-requests 48 \\
        --seed 3 --length-scale 0.5 --server-trace trace.jsonl --output V.json
    python benchmarks/sim_tpot_diagnostic.py --profile P.json --measured V.json --server-trace trace.jsonl \\
        --workload chat --sweep-rates 2,4,8 --num-requests 48 --seed 3 --length-scale 0.5

(the plan's flags as validate's). Prints, per point, the server's row and the simulator's:
requests, tokens each, steps per token, share of mixed steps (prompt chunks of others in them),
rows sampled per step, decode-only and mixed step times (measured; "(priced)": the profile's price
for those same steps), the engine's TPOT from step ends, and the client's (bench) TPOT, also
measured from the chunks' own times. The simulator charges its own steps, so its "(priced)" is
its measured. A run takes seconds (the simulator only; no server).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from punctual.bench.machine import cpu_line
from punctual.bench.report import table
from punctual.sim import diagnose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--measured", required=True, help="`sim validate --output` JSON of the real runs")
    parser.add_argument("--server-trace", default=None,
                        help="the trace `sim validate --server-trace` wrote (without it: the client's side only)")
    parser.add_argument("--workload", default="chat")
    parser.add_argument("--sweep-rates", default="2,4,8")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--length-scale", type=float, default=0.5)
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=200.0)
    parser.add_argument("--serve-args", default="")
    parser.add_argument("--rescale-per-point", action="store_true",
                        help="price each point at its speed probe (as validate --rescale-per-point)")
    args = parser.parse_args()

    from punctual.bench.cli import plan_from_args
    from punctual.bench.loadgen import Endpoint
    from punctual.bench.sweep import bench_endpoint
    from punctual.sim.engine import Simulator
    from punctual.sim.loadgen import SimSender
    from punctual.sim.profile import load_profile
    from punctual.sim.sizing import cluster_config
    from punctual.sim.trace import match_records, read_traces
    from punctual.sim.validate import ValidateConfig, bench_args, engine_flags, point_scales

    profile = load_profile(args.profile)
    config = ValidateConfig(args.profile, workload=args.workload, sweep_rates=args.sweep_rates,
                            num_requests=args.num_requests, seed=args.seed, length_scale=args.length_scale,
                            ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms, serve_args=args.serve_args)
    plan = plan_from_args(bench_args(config))
    sim_config = cluster_config(engine_flags(args.serve_args, profile), profile, plan.slo)
    sim_config = dataclasses.replace(sim_config, repeat_decode_steps=False)  # every step seen
    real_runs = json.loads(Path(args.measured).read_text())["measured"]
    scales = point_scales(real_runs, profile) if args.rescale_per_point else [1.0] * len(real_runs)

    real_steps, real_ids = None, [None] * len(real_runs)
    if args.server_trace:
        trace = read_traces(args.server_trace)
        real_steps = diagnose.trace_steps(trace)
        cursor, real_ids = 0, []
        for run in real_runs:
            matched, cursor = match_records(trace.adds, run["records"], cursor)
            real_ids.append([add["add"] for add in matched if add is not None])

    simulator = Simulator(sim_config, profile)
    sim_steps = diagnose.record_steps(simulator)
    sender = SimSender(simulator, slo=plan.slo)
    sim_ids: list[list[str]] = []
    pending = iter(scales)

    def send(endpoint, requests, **kwargs):
        result = sender(endpoint, requests, **kwargs)
        if kwargs.get("desc") != "warm-up":
            sim_ids.append([f"{simulator._run_id}-{r.index}" for r in result.records])
        return result

    def rescale(workload: str, rate: float | None) -> None:
        simulator.set_profile(profile.scaled(next(pending)))

    sim_runs = bench_endpoint(Endpoint("sim://"), plan, system="sim", progress=False, log=lambda _: None,
                              send=send, before_run=rescale)
    if [(r["workload"], r["rate"]) for r in sim_runs] != [(r["workload"], r["rate"]) for r in real_runs]:
        raise SystemExit("the measured runs are not this plan's points (--workload, --sweep-rates)")

    print(cpu_line())
    rows = []
    for real, sim, ids, ids_sim, scale in zip(real_runs, sim_runs, real_ids, sim_ids, scales):
        label = f"{real['workload']} {real['rate']:g}/s"
        priced = profile.scaled(scale).predict
        breakdown = diagnose.decode_breakdown(real_steps, ids, priced) if real_steps is not None else None
        rows.append(diagnose.table_rows(label, "server", breakdown, diagnose.client_tpots(real["records"])))
        rows.append(diagnose.table_rows(label, "sim", diagnose.decode_breakdown(sim_steps, ids_sim, priced),
                                        diagnose.client_tpots(sim["records"])))
    print(table(diagnose.HEADER, rows))
    print("\nsim / real TPOT, request by request, by the streams it decoded beside on the server:")
    pooled_real, pooled_sim, pooled_streams = [], [], {}
    for point, (real, sim) in enumerate(zip(real_runs, sim_runs)):
        print(f"  {real['workload']} {real['rate']:g}/s: "
              + diagnose.describe_ratios(diagnose.tpot_ratio_by_streams(real["records"], sim["records"])))
        # pooled: every point's requests (indices made distinct), each counted beside its own point's
        streams = diagnose.concurrent_streams([r for r in real["records"] if r.get("tpot_s")])
        pooled_streams.update({(point, index): count for index, count in streams.items()})
        pooled_real += [{**r, "index": (point, r["index"])} for r in real["records"]]
        pooled_sim += [{**r, "index": (point, r["index"])} for r in sim["records"]]
    print("  all points: " + diagnose.describe_ratios(
        diagnose.tpot_ratio_by_streams(pooled_real, pooled_sim, pooled_streams)))


if __name__ == "__main__":
    main()
