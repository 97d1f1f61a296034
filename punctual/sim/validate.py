"""`punctual sim validate`: the same bench plan against a real `punctual serve` here and against
the simulator with a profile of this machine; prints the simulator's errors per point.

Both sides get the same engine flags (the server on its command line, the simulator through
the same `cluster_config`), the same requests (the bench's seeds and salts) and the same
warm-ups; only the model runner differs. The profile should come from `calibrate --server` on
this machine (its front-end delays and serving-loop cost; its requests use other salts).

With `--rescale-per-point`, the server is probed (`punctual.sim.probe`) right before each
measured point, and the simulator prices that point's steps at the profile's costs x (the
probe's seconds per token now / the profile's at calibration): the machine's speed when the
point ran, from a fixed request, never from the point's own measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from punctual.bench.report import table
from punctual.sim.sizing import SimFlags, cluster_config

TARGET_MEDIAN, TARGET_WORST = 0.10, 0.25  # the simulator's promise (issue 33): |error| over the points above
POINTS = (("TTFT p50", "ttft_ms", "median"), ("TTFT p90", "ttft_ms", "p90"),
          ("TPOT p50", "tpot_ms", "median"), ("TPOT p90", "tpot_ms", "p90"))


@dataclass(frozen=True)
class ValidateConfig:
    """What `punctual sim validate` runs (fields named as its flags)."""

    profile: str  # step-cost profile file
    model: str = "builtin"
    workload: str = "chat,shared-prefix"
    sweep_rates: str = "0.5,1,2"
    num_requests: int = 40
    seed: int = 0
    length_scale: float = 0.25
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 200.0
    serve_args: str = ""  # extra `punctual serve` flags, quoted; engine flags here reach the simulator too
    output: str | None = None
    startup_timeout: float = 600.0
    measured: str | None = None  # the real side from an earlier --output JSON instead of a server
    server_trace: str | None = None
    replicas: int = 1
    threads_per_replica: int = 1
    router: str = "cache_aware"
    prefill_replicas: int = 0  # prefill/decode: replicas taking prompts (with decode_replicas; replaces replicas)
    decode_replicas: int = 0
    rescale_per_point: bool = False
    sim_repeats: int = 8


def bench_args(args: ValidateConfig) -> argparse.Namespace:
    """The bench's own flags for the plan both sides run (parsed by the bench's parser, so that
    its defaults and checks apply)."""
    from punctual.bench.cli import add_load_args

    parser = argparse.ArgumentParser()
    add_load_args(parser)
    return parser.parse_args(["--workload", args.workload, "--sweep-rates", args.sweep_rates,
                              "--num-requests", str(args.num_requests), "--seed", str(args.seed),
                              "--length-scale", str(args.length_scale), "--ttft-slo-ms", str(args.ttft_slo_ms),
                              "--tpot-slo-ms", str(args.tpot_slo_ms), "--no-progress"])


def engine_flags(serve_args: str, profile, replicas: int = 1, router: str = "cache_aware",
                 prefill_replicas: int = 0, decode_replicas: int = 0) -> SimFlags:
    """Flags both sides run with: the engine flags in `serve_args` (a `punctual serve` command
    line's), else the calibrated engine's; `router` only with several replicas (with prefill/decode
    it routes among the prefill replicas, which then replace `replicas`)."""
    from punctual.engine_args import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    given = vars(parser.parse_args(shlex.split(serve_args)))
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory"):
        if given[name] is None and name in profile.engine:
            given[name] = profile.engine[name]
    replicas = replicas or 1
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    check_pd_flags(prefill_replicas, decode_replicas, replicas)
    if prefill_replicas:
        replicas = prefill_replicas + decode_replicas
    fields = {f.name for f in dataclasses.fields(SimFlags)}
    return SimFlags(**{name: value for name, value in given.items() if name in fields},
                    num_kv_blocks=profile.num_kv_blocks if given["kv_cache_memory"] is None else None,
                    replicas=replicas, router=router if replicas > 1 else "round_robin",
                    prefill_replicas=prefill_replicas, decode_replicas=decode_replicas)


def check_pd_flags(prefill_replicas: int, decode_replicas: int, replicas: int = 1) -> None:
    """Prefill/decode pools as `punctual serve` takes them: both or neither, and not with --replicas."""
    if (prefill_replicas or decode_replicas) and (prefill_replicas < 1 or decode_replicas < 1):
        raise ValueError("--prefill-replicas and --decode-replicas must both be >= 1 when either is set, "
                         f"got {prefill_replicas} and {decode_replicas}")
    if prefill_replicas and replicas > 1:
        raise ValueError("--replicas: not with --prefill-replicas/--decode-replicas (they replace it)")


def serve_command(flags: SimFlags) -> list[str]:
    out = []
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory", "scheduling_policy"):
        value = getattr(flags, name, None)
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def cluster_serve_args(replicas: int, threads_per_replica: int, router: str, prefill_replicas: int = 0,
                       decode_replicas: int = 0) -> tuple[str, ...]:
    """`punctual serve`'s cluster flags (none for one replica): validate's and calibrate's real
    side; with prefill/decode, its pools in place of --replicas (`replicas` is then their sum or 1)."""
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    check_pd_flags(prefill_replicas, decode_replicas)
    if prefill_replicas:
        return ("--prefill-replicas", str(prefill_replicas), "--decode-replicas", str(decode_replicas),
                "--threads-per-replica", str(threads_per_replica), "--router", router)
    if replicas == 1:
        return ()
    return ("--replicas", str(replicas), "--threads-per-replica", str(threads_per_replica), "--router", router)


def server_args(args: ValidateConfig, flags: SimFlags) -> tuple[str, ...]:
    """`punctual serve`'s flags for the real side: the engine's, the extra ones given, and with
    --replicas the cluster's (each replica on Ray is an engine with those flags)."""
    return (tuple(serve_command(flags)) + tuple(shlex.split(args.serve_args))
            + cluster_serve_args(flags.replicas, args.threads_per_replica, flags.router, flags.prefill_replicas,
                                 flags.decode_replicas))


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
                         "measured_ms": measured, "simulated_ms": simulated, "error": error,
                         "speed_scale": sim.get("speed_scale")})
    return rows


def validate(args: ValidateConfig, log: Callable[[str], None] = print) -> int:
    from punctual.bench.cli import plan_from_args
    from punctual.bench.sweep import goodputs
    from punctual.sim.move_cost import learned_from_cluster
    from punctual.sim.probe import check_reference
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
    if args.prefill_replicas and not learned_from_cluster(profile.kv_transfer):
        log("note: this profile's KV transfer cost was not learned from a served cluster's moves (an offline "
            "copy has no object store or command round trips: far cheaper than a served move); calibrate with "
            "`--server --prefill-replicas P --decode-replicas D`")
    if args.rescale_per_point:  # before the real side runs: a profile without a probe cannot be rescaled
        reference = check_reference(profile.speed_probe)
        log(f"rescaling per point: the profile's speed probe took {reference['token_s'] * 1000:.2f} ms per token")
    plan = plan_from_args(bench_args(args))
    flags = engine_flags(args.serve_args, profile, args.replicas, args.router, args.prefill_replicas,
                         args.decode_replicas)
    config = cluster_config(flags, profile, plan.slo)  # bad flags fail here, not after the real runs
    if args.measured:  # the real side from an earlier run: only the simulator runs (any machine)
        real_runs = json.loads(Path(args.measured).read_text())["measured"]
        log(f"measured runs from {args.measured}")
    else:
        real_runs = measure(args, flags, plan, profile, log)
    scales = point_scales(real_runs, profile, log if args.measured else None) if args.rescale_per_point else None
    sim_runs = simulate(config, profile, plan, scales, log, args.sim_repeats)
    rows = errors(real_runs, sim_runs)
    cluster = None
    header = ["workload", "rate", "metric", "measured", "simulated", "error"] + (["speed"] if scales else [])
    print(table(header, [[r["workload"], f"{r['rate']:g}", r["metric"], _ms(r["measured_ms"]), _ms(r["simulated_ms"]),
                          "-" if r["error"] is None else f"{r['error']:+.0%}"]
                         + ([f"x{r['speed_scale']:.3f}"] if scales else []) for r in rows]))
    from punctual.sim.diagnose import describe_ratios, tpot_ratio_by_streams

    for real, sim in zip(real_runs, sim_runs):  # a ratio that falls as streams grow: a per-stream cost missed
        by_streams = tpot_ratio_by_streams(real.get("records") or [], sim.get("records") or [])
        if by_streams:
            print(f"sim / real TPOT by streams decoding together, {real['workload']} {real['rate']:g} req/s: "
                  + describe_ratios(by_streams))
    valid = [abs(r["error"]) for r in rows if r["error"] is not None]
    good_real, good_sim = goodputs(real_runs, plan.target), goodputs(sim_runs, plan.target)
    met = statistics.median(valid) <= TARGET_MEDIAN and max(valid) <= TARGET_WORST
    print(f"\n|error| median {statistics.median(valid):.0%}, worst {max(valid):.0%} over {len(valid)} points "
          f"({'within' if met else 'outside'} the targets: median {TARGET_MEDIAN:.0%}, worst {TARGET_WORST:.0%})")
    rates = sorted(plan.rates)
    for workload in plan.workloads:
        real_g = good_real.get("punctual", {}).get(workload, {}).get("goodput")
        sim_g = good_sim.get("sim", {}).get(workload, {}).get("goodput")
        steps = abs(_index(rates, real_g) - _index(rates, sim_g))
        print(f"goodput {workload}: measured {real_g}, simulated {sim_g} req/s "
              f"({'equal' if steps == 0 else f'{steps} sweep step(s) apart'})")
    if config.replicas > 1:
        if all("cluster" in run for run in real_runs):
            from punctual.sim.validate_cluster import print_cluster

            print()
            cluster = print_cluster(real_runs, sim_runs, profile, config.block_size, log)
        else:
            log("routing not compared: the measured runs have no per-replica outcomes")
    if args.output:
        Path(args.output).write_text(json.dumps({"errors": rows, "measured": real_runs, "simulated": sim_runs,
                                                 "goodput": {"measured": good_real, "simulated": good_sim},
                                                 **({"cluster": cluster} if cluster else {})},
                                                indent=1, default=str))
    return 0


def simulate(config, profile, plan, scales: list[float] | None = None,
             log: Callable[[str], None] = print, repeats: int = 1) -> list[dict]:
    """The plan on the simulator: one simulator for every point, as one server serves them all
    (its prefix caches carry over). `scales`: each measured point's factor on the profile's step
    costs, in the plan's order (None: the profile as it is); each run keeps its "speed_scale".

    `repeats` > 1, with a profile that has a spread: the plan runs on that many simulators, each
    with its own set of draws (spread seeds 0, 1, ...), and each point's summary is the median of
    theirs (`median_summary`); its records are the first set's. What the simulator predicts is
    where a point's p90 lies, and one set of draws over a few dozen requests scatters it by a
    fifth either way. Without a spread every repeat is the same run: one is made."""
    from punctual.bench.loadgen import Endpoint
    from punctual.bench.sweep import bench_endpoint
    from punctual.sim.engine import Simulator
    from punctual.sim.loadgen import SimSender
    from punctual.sim.validate_cluster import WatchedSimulator

    if repeats < 1:
        raise ValueError(f"--sim-repeats must be >= 1, got {repeats}")
    if profile.step_ratios is None and profile.admit_quantiles is None:
        repeats = 1
    sets, watched = [], []
    for seed in range(repeats):
        simulator = Simulator(config, profile, spread_seed=seed)
        send = SimSender(simulator, slo=plan.slo)
        if config.replicas > 1:  # where the router sent each point's requests, and the caches' hits
            send = WatchedSimulator(send, simulator)
            watched.append(send)
        pending = iter(scales or ())

        def rescale(workload: str, rate: float | None, simulator=simulator, pending=pending) -> None:
            simulator.set_profile(profile.scaled(next(pending)))

        sets.append(bench_endpoint(Endpoint("sim://"), plan, system="sim", progress=False,
                                   log=log if seed == 0 else (lambda _: None), send=send,
                                   before_run=None if scales is None else rescale))
    runs = sets[0]
    for run, point in zip(runs, watched[0].points if watched else ()):
        run["cluster"] = point  # the first set's (the repeats differ in step times, and so in routing)
    if repeats > 1:
        for i, run in enumerate(runs):
            run["summary"] = median_summary([each[i]["summary"] for each in sets])
            run["sim_repeats"] = repeats
        log(f"simulated every point {repeats} times with other draws from the profile's spread; "
            f"the medians are compared (the lines above are the first set's)")
    if scales is not None:
        if len(scales) != len(runs):
            raise ValueError(f"{len(scales)} speed scales for {len(runs)} simulated points")
        for run, scale in zip(runs, scales):
            run["speed_scale"] = scale
    return runs


def median_summary(summaries: list[dict]):
    """Bench summaries merged leaf by leaf: the median of each number, the first's anything else."""
    first = summaries[0]
    if isinstance(first, dict):
        return {key: median_summary([s.get(key) for s in summaries]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
            isinstance(s, (int, float)) for s in summaries):
        return statistics.median(summaries)
    return first


def point_scales(real_runs: list[dict], profile, log: Callable[[str], None] | None = None) -> list[float]:
    """Each measured point's factor on the step costs: its speed probe against the profile's."""
    from punctual.sim.probe import speed_scale

    scales = []
    for run in real_runs:
        probe = run.get("speed_probe")
        if probe is None:
            raise ValueError(f"--rescale-per-point: the measured point {run['workload']} {run['rate']:g} req/s "
                             "has no speed probe (measured without --rescale-per-point)")
        scales.append(speed_scale(profile.speed_probe, probe["token_s"]))
        if log is not None:
            log(f"speed probe before {run['workload']} {run['rate']:g} req/s: "
                f"{probe['token_s'] * 1000:.2f} ms per token, steps x {scales[-1]:.3f}")
    return scales


def measure(args: ValidateConfig, flags: SimFlags, plan, profile,
            log: Callable[[str], None]) -> list[dict]:
    """The bench plan against a real `punctual serve` started here with the same engine flags."""
    from punctual.bench import loadgen
    from punctual.bench.peers import PeerOptions, free_port, punctual_peer, running
    from punctual.bench.sweep import bench_endpoint
    from punctual.sim.probe import run_probe, speed_scale
    from punctual.sim.validate_cluster import WatchedServer, real_replica_runs

    extra = server_args(args, flags)
    options = PeerOptions(max_num_seqs=flags.max_num_seqs or 32, punctual_args=extra)
    spec = punctual_peer(args.model, free_port(), options)
    log(f"starting {shlex.join(spec.command)}")
    log_path = Path(tempfile.mkdtemp(prefix="punctual-validate-")) / "server.log"
    cluster = flags.replicas > 1
    # A cluster is always traced: each replica's trace counts the requests the router sent it
    # (as when it was calibrated, so the trace's own cost is in the profile too).
    trace_path = args.server_trace or (str(log_path.parent / "steps.jsonl") if cluster else None)
    if trace_path:  # the core's own record of the real runs (`punctual.engine.trace`)
        from punctual.engine.trace import TRACE_ENV, trace_paths

        for stale in trace_paths(trace_path):  # with --replicas, one file per replica
            Path(stale).unlink()
        spec = dataclasses.replace(spec, env={**spec.env, TRACE_ENV: trace_path})
    probes: list[dict] = []
    with running(spec, log_path, args.startup_timeout) as endpoint:
        def probe(workload: str, rate: float | None) -> None:
            measured = run_probe(endpoint)
            measured["scale"] = speed_scale(profile.speed_probe, measured["token_s"])
            probes.append(measured)
            log(f"speed probe before {workload} {rate:g} req/s: {measured['token_s'] * 1000:.2f} ms per token "
                f"(calibration {profile.speed_probe['token_s'] * 1000:.2f}): steps x {measured['scale']:.3f}, "
                f"probed in {measured['seconds']:.1f} s")

        watch = WatchedServer(loadgen.run, endpoint.base_url) if cluster else None
        real_runs = bench_endpoint(endpoint, plan, system="punctual", progress=False, log=log,
                                   send=watch, before_run=probe if args.rescale_per_point else None)
        if trace_path:
            time.sleep(0.5)  # the core writes its trace when it goes idle
    for run, measured in zip(real_runs, probes):
        run["speed_probe"] = measured
    if cluster:
        for run, point in zip(real_runs, real_replica_runs(watch, trace_path, flags.replicas)):
            run["cluster"] = point
    if args.server_trace:
        first_token_paths(args.server_trace, real_runs, profile, log)
    return real_runs


def first_token_paths(trace_path: str, real_runs: list[dict], profile, log: Callable[[str], None] = print) -> None:
    """Each measured record gets "server": where its TTFT went (`trace.first_token_path`), with
    the profile's cost of that first step beside the traced one ("predicted_step_s", at the
    point's probed speed when there is a probe); per run, the medians, and over all runs the fit
    of the delivery delay against the streams in the first token's step (does the front end slow
    down with the streams it serves?)."""
    from punctual.sim.trace import delivery_line, first_token_path, match_records, read_traces

    trace = read_traces(trace_path)  # a cluster's: every replica's, merged
    cursor, deliveries = 0, []
    for run in real_runs:
        records = run.get("records") or []
        matched, cursor = match_records(trace.adds, records, cursor)
        probe = run.get("speed_probe")  # with --rescale-per-point: price the step at the point's speed
        priced = profile if probe is None else profile.scaled(probe["scale"])
        paths = []
        for record, add in zip(records, matched):
            path = None if add is None else first_token_path(trace, add, record.get("ttft_s"))
            if path is not None:
                path["predicted_step_s"] = priced.predict(tuple(path["step"]))
            record["server"] = path
            if path is not None and path["deliver_s"] is not None:
                paths.append(path)
                deliveries.append((path["streams"], path["deliver_s"]))
        if paths:
            part = {k: statistics.median(p[k] for p in paths) * 1000
                    for k in ("admit_s", "queued_s", "first_step_s", "predicted_step_s", "deliver_s")}
            log(f"server trace, {run['workload']} {run['rate']:g} req/s ({len(paths)}/{len(records)} matched): "
                "TTFT medians " + ", ".join(f"{k[:-2]} {v:.1f} ms" for k, v in part.items()))
    line = delivery_line(deliveries)
    if line is not None:
        streams = [s for s, _ in deliveries]
        log(f"server trace: deliver = {line[0] * 1000:.2f} ms + {line[1] * 1000:.3f} ms x streams in the first "
            f"token's step ({len(streams)} requests, {min(streams):g}-{max(streams):g} streams)")


def _index(rates: list[float], goodput: float | None) -> int:
    return -1 if goodput is None else rates.index(goodput)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"
