"""`punctual sim`: run, calibrate, plan, validate."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from punctual.sim.sizing import SimFlags, cluster_config

AUTO_MIN_REPLICAS = 32  # below this a run takes seconds: one process, exact routing
AUTO_MIN_CPUS = 2  # auto splits only on a machine with at least this many CPUs
DEFAULT_STALENESS_MS = 10.0  # about one decode step of an 8B model on a GPU (sim/stale.py; measured in the report)


def add_sim_parser(subparsers) -> None:
    from punctual.bench.cli import add_load_args

    sim = subparsers.add_parser("sim", help="simulate the scheduler in virtual time: run, calibrate, plan, validate",
                                description="A discrete-event simulator that runs the shipped scheduler, KV "
                                            "manager and router with the model replaced by a step-cost profile.")
    sub = sim.add_subparsers(dest="sim_command", required=True)

    run = sub.add_parser("run", help="simulate `punctual bench` against a cluster; same report, JSON and plots")
    run.add_argument("--profile", required=True, help="step-cost profile (JSON from `punctual sim calibrate`)")
    add_cluster_args(run)
    run.add_argument("--sim-processes", default="auto",
                     help="split the replicas across this many processes; auto: one per CPU from "
                          f"{AUTO_MIN_REPLICAS} replicas on, on a machine of {AUTO_MIN_CPUS}+ CPUs (open loop, "
                          "no --migration, prefill/decode or adapters), else 1. round_robin reads no replica "
                          "state: the same results as one process; cache_aware and least_loaded then decide on "
                          "state up to --sim-staleness-ms late")
    run.add_argument("--sim-staleness-ms", type=float, default=DEFAULT_STALENESS_MS,
                     help="with --sim-processes > 1 and a router that reads replica state: the shards publish "
                          "their replicas' loads and prefix-cache events every half this many virtual ms and "
                          "the router decides each arrival on the publication before the last one, while the "
                          "shards go on (so on state half to all of this old); 0: at every arrival instant, the "
                          "same results as one process, slower")
    run.add_argument("--plan-every-step", action="store_true",
                     help="plan every step of every replica (the exact path the default is checked against: the "
                          "same answers, slower); by default a replica's repeated decode steps are priced in runs")
    add_load_args(run)
    run.set_defaults(func=cmd_run)

    calibrate = sub.add_parser("calibrate", help="profile the real model runner here (or estimate a machine "
                                                 "with --hardware) and write a step-cost profile")
    calibrate.add_argument("model", nargs="?", default="builtin",
                           help="checkpoint directory, builtin / builtin-tiny / smollm2, or (with --hardware) "
                                "a known shape: " + ", ".join(_known_shapes()))
    calibrate.add_argument("--output", required=True, help="profile file to write")
    calibrate.add_argument("--hardware", default=None,
                           help="derive a roofline estimate for this machine instead of measuring: "
                                + ", ".join(_hardware_names()))
    link = calibrate.add_argument_group("with --hardware and --tensor-parallel-size N > 1: one rank of N machines")
    link.add_argument("--link-latency-us", type=float, default=None, help="one message between machines, us")
    link.add_argument("--link-gbps", type=float, default=10.0, help="each machine's link, Gbit/s")
    link.add_argument("--link-profile", default=None,
                      help="a measured link (benchmarks/bench_allreduce.py --output) instead of the two above")
    link.add_argument("--allreduce", choices=["star", "ring"], default="star")
    link.add_argument("--machine-memory", default=None, help="each machine's memory (default: the preset's)")
    calibrate.add_argument("--max-prompt", type=int, default=512, help="longest prompt chunk profiled")
    calibrate.add_argument("--max-batch", type=int, default=32, help="largest decode batch profiled")
    calibrate.add_argument("--repeats", type=int, default=1, help="times each shape is profiled")
    calibrate.add_argument("--threads", type=int, default=None,
                           help="CPU threads of the engine profiled, and of the --server it starts (default: "
                                "torch's); 1 to profile a replica of `serve --replicas N --threads-per-replica 1`")
    server = calibrate.add_argument_group("the serving path (--server)")
    server.add_argument("--server", action="store_true",
                        help="also run `punctual serve` here under load and fit the front end's delays and the "
                             "serving loop's step times (contention included) onto the profile")
    server.add_argument("--base-profile", default=None,
                        help="with --server: start from this offline profile instead of calibrating one first")
    server.add_argument("--server-workload", default="chat")
    server.add_argument("--server-rates", default="1,2", help="open-loop rates run for loaded steps")
    server.add_argument("--server-requests", type=int, default=30, help="requests per rate")
    server.add_argument("--server-length-scale", type=float, default=0.25)
    server.add_argument("--serve-args", default="", help="extra `punctual serve` flags, quoted")
    server.add_argument("--replicas", type=int, default=1,
                        help="with --server: fit the serving path on a cluster (`serve --replicas N` on Ray, "
                             "every replica traced), for `sim validate --replicas N`")
    server.add_argument("--threads-per-replica", type=int, default=1, help="with --replicas: each replica's threads")
    server.add_argument("--router", default="cache_aware", choices=["cache_aware", "least_loaded", "round_robin"],
                        help="with --replicas: the cluster's router")
    server.add_argument("--prefill-replicas", type=int, default=0,
                        help="with --server: fit on a prefill/decode cluster (`serve --prefill-replicas P "
                             "--decode-replicas D`), and take the KV transfer cost its moves learned")
    server.add_argument("--decode-replicas", type=int, default=0, help="with --prefill-replicas")
    from punctual.engine_args import add_engine_args

    add_engine_args(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    plan = sub.add_parser("plan", help="search replicas, token budget and policy for the cheapest "
                                       "configuration that meets the SLOs at a target rate")
    plan.add_argument("--profile", default=None, help="step-cost profile to simulate (or --hardware)")
    plan.add_argument("--workload", default="chat")
    plan.add_argument("--request-rate", type=float, default=None, help="target requests per second (with --profile)")
    plan.add_argument("--ttft-slo-ms", type=float, default=None, help="with --profile")
    plan.add_argument("--tpot-slo-ms", type=float, required=True)
    tp = plan.add_argument_group("tensor parallelism (--hardware instead of --profile): the fewest machines per "
                                 "link latency whose decode step meets --tpot-slo-ms (a roofline ESTIMATE)")
    tp.add_argument("--hardware", default=None, help="each machine: " + ", ".join(_hardware_names()))
    tp.add_argument("--model", default=None, help="a known shape (" + ", ".join(_known_shapes()) + ") or a "
                                                  "checkpoint directory")
    tp.add_argument("--machine-memory", default=None, help="each machine's memory (e.g. 32GiB; default: the preset's)")
    tp.add_argument("--tensor-parallel-sizes", default="1,2,4,8,16,32,64", help="group sizes to try")
    tp.add_argument("--link-latency-us", default="50,200,1000",
                    help="comma-separated latencies of one message between machines, microseconds")
    tp.add_argument("--link-gbps", type=float, default=10.0, help="each machine's link, Gbit/s")
    tp.add_argument("--link-profile", default=None,
                    help="a measured link (benchmarks/bench_allreduce.py --output): its latency and bandwidth "
                         "replace --link-latency-us and --link-gbps")
    tp.add_argument("--allreduce", choices=["star", "ring"], default="star",
                    help="star: 2 rounds through a hub (TPI-LLM's; latency-bound links); ring: 2(N-1) rounds")
    tp.add_argument("--streams", type=int, default=1, help="the load: streams decoding at once")
    tp.add_argument("--context-len", type=int, default=1024, help="tokens of context of each stream")
    tp.add_argument("--quantization", choices=["none", "int8", "int4"], default="none", help="weights (none: --dtype)")
    tp.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    tp.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    plan.add_argument("--attainment-target", type=float, default=0.9)
    plan.add_argument("--num-requests", type=int, default=None,
                      help="requests simulated per candidate (default: 60 s of traffic, 500 to 20000)")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--length-scale", type=float, default=1.0)
    plan.add_argument("--burstiness", type=float, default=1.0)
    plan.add_argument("--policies", default="fcfs,slo", help="comma-separated scheduling policies to try")
    plan.add_argument("--budgets", default="256,512,1024,2048", help="comma-separated token budgets to try")
    plan.add_argument("--max-num-seqs", type=int, default=128)
    plan.add_argument("--pd-splits", default="0",
                      help="comma-separated prefill shares of the replicas to try: 0 colocated, e.g. 0.25 for "
                           "one prefill replica in four (prefill/decode disaggregation; needs a KV transfer cost "
                           "in the profile)")
    plan.add_argument("--min-replicas", type=int, default=1, help="where the search starts (a lower bound you know)")
    plan.add_argument("--max-replicas", type=int, default=4096)
    plan.add_argument("--router", default="least_loaded")
    plan.add_argument("--block-size", type=int, default=16)
    plan.add_argument("--kv-cache-memory", default=None)
    plan.add_argument("--num-kv-blocks", type=int, default=None)
    plan.add_argument("--cost-per-replica-hour", type=float, default=None,
                      help="price of one replica (e.g. one GPU) per hour, for the cost column")
    plan.add_argument("--output", default=None, help="write the explored frontier here as JSON")
    plan.set_defaults(func=cmd_plan)

    validate = sub.add_parser("validate", help="run a real server and the simulator on the same workloads here "
                                               "and print the simulator's errors")
    validate.add_argument("--profile", required=True)
    validate.add_argument("--model", default="builtin")
    validate.add_argument("--workload", default="chat,shared-prefix")
    validate.add_argument("--sweep-rates", default="0.5,1,2")
    validate.add_argument("--num-requests", type=int, default=40)
    validate.add_argument("--seed", type=int, default=0)
    validate.add_argument("--length-scale", type=float, default=0.25)
    validate.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    validate.add_argument("--tpot-slo-ms", type=float, default=200.0)
    validate.add_argument("--serve-args", default="", help="extra `punctual serve` flags, quoted (engine flags "
                                                            "here are given to the simulator too)")
    validate.add_argument("--output", default=None, help="write both reports and the errors here as JSON")
    validate.add_argument("--startup-timeout", type=float, default=600.0)
    validate.add_argument("--measured", default=None,
                          help="take the real side from an earlier --output JSON (same plan) instead of running "
                               "a server: compares a changed profile or simulator with the same measurements")
    validate.add_argument("--server-trace", default=None,
                          help="write the real server core's step trace here (with --replicas, FILE.replicaN "
                               "per replica) and break each measured TTFT down (front end in, queued, first step, "
                               "delivery) into the --output JSON")
    validate.add_argument("--replicas", type=int, default=1,
                          help="validate a cluster: the server runs `--replicas N` on Ray, the simulator N replicas "
                               "behind the same router (calibrate the profile with --threads equal to "
                               "--threads-per-replica, and --server with the same --replicas and --router)")
    validate.add_argument("--threads-per-replica", type=int, default=1, help="with --replicas: each replica's threads")
    validate.add_argument("--router", default="cache_aware", choices=["cache_aware", "least_loaded", "round_robin"],
                          help="with --replicas: the cluster's router, run by both sides")
    validate.add_argument("--prefill-replicas", type=int, default=0,
                          help="validate prefill/decode disaggregation: the server runs `--prefill-replicas P "
                               "--decode-replicas D` on Ray (in place of --replicas), the simulator the same pools "
                               "(calibrate with --server and the same two flags, so the profile prices the "
                               "cluster's KV moves)")
    validate.add_argument("--decode-replicas", type=int, default=0, help="with --prefill-replicas")
    validate.add_argument("--rescale-per-point", action="store_true",
                          help="probe the server's speed right before each point (a fixed request, ~2 s) and "
                               "scale that point's simulated step costs by the probe's seconds per token over "
                               "the profile's, recorded at calibration (needs a profile from `calibrate "
                               "--server` with a speed probe); each point's factor is logged and kept in --output")
    validate.add_argument("--sim-repeats", type=int, default=8,
                          help="with a profile that has a spread (`calibrate --server`): simulate every point this "
                               "many times, each with other draws of step times and admit delays, and compare the "
                               "medians (a p90 over a few dozen requests moves by a fifth between sets of draws)")
    validate.set_defaults(func=cmd_validate)


def _known_shapes() -> list[str]:
    from punctual.sim.hardware import KNOWN_SHAPES

    return sorted(KNOWN_SHAPES)


def _hardware_names() -> list[str]:
    from punctual.sim.hardware import HARDWARE

    return sorted(HARDWARE)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags that shape scheduling (names and defaults as `punctual serve`), and the cluster's."""
    from punctual.engine_args import add_engine_args

    engine = parser.add_argument_group("engine (as punctual serve; each replica's)")
    add_engine_args(engine, only=("--max-num-seqs", "--max-num-batched-tokens", "--scheduling-policy",
                                  "--slo-overload-action", "--block-size", "--kv-cache-memory"))
    engine.add_argument("--num-kv-blocks", type=int, default=None, help="each replica's KV pool in blocks")
    add_engine_args(engine, only=("--max-model-len", "--enable-prefix-caching"))
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--replicas", type=int, default=1)
    cluster.add_argument("--prefill-replicas", type=int, default=0,
                         help="prefill/decode disaggregation, as punctual serve: replicas taking prompts (with "
                              "--decode-replicas; together they replace --replicas)")
    cluster.add_argument("--decode-replicas", type=int, default=0,
                         help="replicas that decode requests whose KV moved from a prefill replica")
    cluster.add_argument("--router", default="cache_aware", choices=["cache_aware", "least_loaded", "round_robin"],
                         help="the cluster's router (punctual.cluster.router), as punctual serve")
    cluster.add_argument("--migration", choices=["on", "off"], default="off",
                         help="as punctual serve: rebalance by moving running requests with their KV, and move a "
                              "less important one off to make room (each copy costs the profile's transfer time)")
    cluster.add_argument("--migration-threshold", type=int, default=2,
                         help="with --migration on: rebalance when the busiest replica runs this many more "
                              "requests than the idlest")
    lora = parser.add_argument_group("LoRA adapters (each request runs under one; priced per step)")
    lora.add_argument("--num-adapters", type=int, default=0,
                      help="spread requests over this many LoRA adapters, Zipf popularity (0: the base model only)")
    lora.add_argument("--adapter-zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity (0: uniform)")
    add_engine_args(lora, only=("--max-loras", "--max-cpu-loras"))
    lora.add_argument("--lora-load-ms", type=float, default=None,
                      help="reading an adapter from disk (default: an estimate, see punctual/sim/lora.py)")
    lora.add_argument("--lora-swap-ms", type=float, default=None, help="taking a loaded adapter into a slot")
    lora.add_argument("--lora-group-ms", type=float, default=None, help="each adapter group's low-rank terms per step")


def sim_flags(args: argparse.Namespace) -> SimFlags:
    """The SimFlags of parsed flags (a command may have only some of them: the others default)."""
    return SimFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SimFlags) if hasattr(args, f.name)})


def cmd_run(args: argparse.Namespace) -> int:
    from punctual.bench.cli import finish, plan_from_args
    from punctual.bench.loadgen import Endpoint
    from punctual.bench.sweep import bench_endpoint
    from punctual.sim.engine import Simulator
    from punctual.sim.loadgen import SimSender
    from punctual.sim.profile import load_profile

    plan = plan_from_args(args)
    if plan.keep_records and not (args.output or args.plot):
        # Nothing writes the per-request records: the summary's ITL and fluidity come from
        # streamed statistics instead (the same values; SimSender), without a float per token
        # held and summarized (a sixth of a 100-replica run's time).
        plan = dataclasses.replace(plan, keep_records=False)
    profile = load_profile(args.profile)
    config = cluster_config(sim_flags(args), profile, plan.slo)
    if args.plan_every_step:
        config = dataclasses.replace(config, repeat_decode_steps=False)
    processes = sim_processes(args.sim_processes, config, plan.concurrency, args.num_adapters)
    if processes > 1 and config.cluster.router == "round_robin":
        from punctual.sim.shards import ShardedSimulator

        simulator = ShardedSimulator(config, profile, processes)
    elif processes > 1:
        from punctual.sim.stale import StaleRouterSimulator

        simulator = StaleRouterSimulator(config, profile, processes, args.sim_staleness_ms / 1000)
    else:
        simulator = Simulator(config, profile)
    if args.num_adapters and processes > 1:
        raise ValueError("--num-adapters: not with --sim-processes > 1 (run adapters in one process)")
    sender = SimSender(simulator, keep_token_times=plan.keep_records, slo=plan.slo,
                       num_adapters=args.num_adapters, adapter_zipf=args.adapter_zipf)
    started, cpu = time.perf_counter(), time.process_time()
    try:
        runs = bench_endpoint(Endpoint("sim://"), plan, system="sim", progress=False, log=_log, send=sender)
    finally:
        if processes > 1:
            simulator.close()
    sender.patch(runs)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    _log(f"simulated {simulator.now:.1f} virtual s on {config.replicas} replica(s): "
         f"{simulator.num_events} events, {simulator.num_steps} steps in {wall:.1f} s wall, "
         f"{cpu:.1f} s CPU in this process ({simulator.num_events / wall:,.0f} events/s)" if wall > 0 else "")
    if getattr(simulator, "num_windows", 0):
        _log(f"{processes} processes: the {config.cluster.router} router decided on replica state up to "
             f"{args.sim_staleness_ms:g} ms late ({simulator.num_windows} windows)")
    if getattr(simulator, "decode_pool", None):
        _log(f"prefill/decode: {simulator.moves.get('disaggregation', 0)} requests moved their KV to the decode "
             f"pool")
    if getattr(simulator, "num_moves", 0) or getattr(simulator, "num_moves_refused", 0):
        _log(f"KV moves: {', '.join(f'{n} {reason}' for reason, n in sorted(simulator.moves.items())) or 'none'} "
             f"landed; {simulator.num_moves_refused} refused or called off (no room, or the request ended first)")
    return finish(args, plan, runs, {})


def sim_processes(flag: str, config, concurrency: int | None, num_adapters: int) -> int:
    """--sim-processes as a count: a number, or auto (one per CPU on a big open-loop cluster
    whose requests stay on their replica)."""
    import os

    if flag != "auto":
        try:
            processes = int(flag)
        except ValueError:
            raise ValueError(f"--sim-processes must be a number or auto, got {flag!r}") from None
        if processes < 1:
            raise ValueError(f"--sim-processes must be >= 1, got {processes}")
        return processes
    cluster = config.cluster
    if (cluster.replicas < AUTO_MIN_REPLICAS or cluster.prefill_replicas or cluster.migration or num_adapters
            or config.lora is not None or concurrency is not None):
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # The router decides a window ahead while the shards simulate (sim/stale.py): on 2 CPUs the
    # split ran 100,000 requests over 100 replicas (cache_aware) 1.08-1.26x faster than one process
    # in back-to-back pairs; it spends ~25% more CPU in all, so it breaks even where the second
    # CPU is busy.
    return cpus if cpus >= AUTO_MIN_CPUS else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.hardware:
        from punctual.config import parse_size
        from punctual.sim.hardware import roofline_profile
        from punctual.sim.tensor_parallel import Link, load_link

        link = None
        if args.link_profile:
            link = load_link(args.link_profile, args.allreduce)
        elif args.link_latency_us is not None:
            link = Link(args.link_latency_us / 1e6, args.link_gbps * 1e9 / 8, args.allreduce)
        profile = roofline_profile(args.model, args.hardware, dtype=args.dtype,
                                   tensor_parallel_size=args.tensor_parallel_size or 1, link=link,
                                   quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                                   memory_bytes=parse_size(args.machine_memory, "--machine-memory"))
        profile.save(args.output)
        _log(f"wrote {args.output}: an ESTIMATE for {args.model} on {args.hardware} (roofline, not measured)")
        return 0
    if args.link_latency_us is not None or args.link_profile or args.machine_memory:
        raise ValueError("--link-latency-us, --link-profile, --machine-memory: only with --hardware")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if (args.replicas != 1 or args.prefill_replicas or args.decode_replicas) and not args.server:
        raise ValueError("--replicas/--prefill-replicas/--decode-replicas: only with --server (the offline profile "
                         "is one replica's: use --threads)")
    from punctual.sim.validate import check_pd_flags

    check_pd_flags(args.prefill_replicas, args.decode_replicas, args.replicas)
    if args.base_profile:
        if not args.server:
            raise ValueError("--base-profile: only with --server")
        from punctual.sim.profile import load_profile

        profile = load_profile(args.base_profile)
    else:
        from punctual.engine_args import engine_kwargs
        from punctual.sim.calibrate import calibrate

        profile = calibrate(args.model, engine_kwargs(args), max_prompt=args.max_prompt, max_batch=args.max_batch,
                            repeats=args.repeats, log=_log)
        fit = profile.fit
        _log(f"offline: {fit['num_steps']} steps ({fit['num_outliers']} slowed by interference, left out), "
             f"median |error| {fit['median_abs_rel_error']:.1%}, p90 {fit['p90_abs_rel_error']:.1%}")
    if args.server:
        import shlex

        from punctual.sim.calibrate_server import calibrate_server
        from punctual.sim.validate import engine_flags, serve_command

        flags = engine_flags(args.serve_args, profile)
        serve_args = serve_command(flags) + shlex.split(args.serve_args)
        rates = tuple(float(r) for r in args.server_rates.split(",") if r.strip())
        profile = calibrate_server(profile, args.model, serve_args, workload=args.server_workload, rates=rates,
                                   num_requests=args.server_requests, length_scale=args.server_length_scale,
                                   max_num_seqs=flags.max_num_seqs or 32, threads=args.threads,
                                   replicas=args.replicas, threads_per_replica=args.threads_per_replica,
                                   router=args.router, prefill_replicas=args.prefill_replicas,
                                   decode_replicas=args.decode_replicas, log=_log)
        server, frontend = profile.fit["server"], profile.frontend
        _log(f"serving loop: step = {server['scale']:.3f} x offline + {server['overhead_s'] * 1000:.2f} ms + "
             f"{server['per_row_s'] * 1000:.3f} ms per sampled row + "
             f"{server.get('prefill_step_s', 0.0) * 1000:.2f} ms per step with prompt tokens, over "
             f"{server['num_steps']} steps ({server['num_outliers']} left out), median |error| "
             f"{server['median_abs_rel_error']:.1%}, mean {server['mean_step_s'] * 1000:.2f} ms measured, "
             f"{server['mean_predicted_s'] * 1000:.2f} ms fitted; measured / fitted time by streams in a step: "
             + (", ".join(f"{label}: {b['time_ratio']:.3f} ({b['num_steps']} steps)"
                          for label, b in server.get("by_batch", {}).items()) or "-")
             + f"; front end: admit {frontend['admit_s'] * 1000:.2f} ms, "
             f"deliver {frontend['deliver_s'] * 1000:.2f} ms + {profile.deliver_per_stream_s * 1000:.3f} ms per stream")
    profile.save(args.output)
    _log(f"wrote {args.output}")
    return 0


def _items(text: str, kind, flag: str) -> tuple:
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag}: a comma-separated list of numbers, got {text!r}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from punctual.sim.planner import PlanConfig, plan_capacity

    if args.hardware:
        if args.profile:
            raise ValueError("--profile and --hardware: give one (a profile to simulate, or machines to estimate)")
        if not args.model:
            raise ValueError("--hardware: name the --model (a known shape or a checkpoint directory)")
        from punctual.config import parse_size
        from punctual.sim.tp_plan import TPPlanConfig, plan_tensor_parallel

        return plan_tensor_parallel(TPPlanConfig(
            args.model, args.hardware, args.tpot_slo_ms,
            tensor_parallel_sizes=_items(args.tensor_parallel_sizes, int, "--tensor-parallel-sizes"),
            link_latencies_us=_items(args.link_latency_us, float, "--link-latency-us"), link_gbps=args.link_gbps,
            link_profile=args.link_profile, allreduce=args.allreduce, streams=args.streams,
            context_len=args.context_len, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
            dtype=args.dtype, machine_memory=parse_size(args.machine_memory, "--machine-memory")))
    missing = [flag for flag, value in (("--profile", args.profile), ("--request-rate", args.request_rate),
                                        ("--ttft-slo-ms", args.ttft_slo_ms)) if value is None]
    if missing:
        raise ValueError(f"sim plan: {', '.join(missing)} required (or --hardware and --model for a "
                         "tensor-parallel estimate)")

    def items(text: str, kind):
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(PlanConfig)}
    config = PlanConfig(**{**given, "policies": items(args.policies, str), "budgets": items(args.budgets, int),
                           "pd_splits": items(args.pd_splits, float)})
    return plan_capacity(config, log=_log)


def cmd_validate(args: argparse.Namespace) -> int:
    from punctual.sim.validate import ValidateConfig, validate

    return validate(ValidateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ValidateConfig)}),
                    log=_log)


def _log(message: str) -> None:
    if message:
        print(message, file=sys.stderr, flush=True)


__all__ = ["add_sim_parser"]
