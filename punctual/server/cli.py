"""`punctual serve`: the OpenAI-compatible server on uvicorn, with a graceful SIGTERM."""
from __future__ import annotations

import argparse
import logging
import os
import signal


def add_serve_parser(subparsers) -> None:
    from punctual.engine_args import add_engine_args

    serve = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("model", nargs="?", default="builtin",
                       help="checkpoint directory, .gguf file, or builtin / builtin-tiny / smollm2")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    serve.add_argument("--api-key", action="append", default=None,
                       help="require `Authorization: Bearer KEY` on /v1 routes (repeatable: any of them; "
                            "default: $PUNCTUAL_API_KEY); a key given alone is tenant key-N, N its position")
    serve.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="API keys with their tenants, one `KEY TENANT` a line (# comments); with --api-key")
    serve.add_argument("--prefix-cache-isolation", default="none", choices=["none", "api-key", "user"],
                       help="who shares prefix-cache blocks: none (requests with the same cache_salt), api-key "
                            "(each key's tenant its own), user (each `user` field its own); overrides cache_salt")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="LoRA adapters served as models of their own (with --enable-lora): name=path, or "
                            'vLLM\'s JSON form \'{"name": ..., "path": ..., "base_model_name": ...}\'')
    serve.add_argument("--max-queue-len", type=int, default=1024,
                       help="queued + running requests beyond which new ones get 429")
    serve.add_argument("--ttft-slo-ms", type=float, default=None, help="default TTFT SLO of a request")
    serve.add_argument("--tpot-slo-ms", type=float, default=None, help="default TPOT SLO of a request")
    serve.add_argument("--shutdown-timeout", type=float, default=5.0,
                       help="seconds in-flight requests may run on after SIGTERM before they are aborted")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.add_argument("--check-integrity", action="store_true",
                       help="the engine core checks its KV pool, prefix cache and scheduler invariants whenever "
                            "it goes idle (for tests and debugging; a violation stops the core)")
    cluster = serve.add_argument_group("replicas (Ray)")
    cluster.add_argument("--replicas", type=int, default=1,
                         help="engine replicas, each a Ray actor with its own process; every engine flag applies to each")
    cluster.add_argument("--threads-per-replica", type=int, default=1, help="CPU threads (Ray CPUs) of each replica (with --tensor-parallel-size N: of each of its N ranks, "
                              "unless --threads-per-rank)")
    cluster.add_argument("--gpus-per-replica", type=float, default=0, help="GPUs of each replica (1 on a GPU node)")
    cluster.add_argument("--ray-address", default=None,
                         help="join this Ray cluster (e.g. auto, or ray://head:10001); default: a local Ray "
                              "instance started in this process, on loopback, without its dashboard")
    cluster.add_argument("--router", default="cache_aware", choices=["cache_aware", "least_loaded", "round_robin"],
                         help="how requests are spread over replicas")
    cluster.add_argument("--router-option", action="append", default=[], metavar="NAME=VALUE",
                         help="a router knob, e.g. hot_spot_margin=1e9 (repeatable; numbers)")
    cluster.add_argument("--prefill-replicas", type=int, default=0,
                         help="prefill/decode disaggregation: replicas that take prompts (with --decode-replicas; "
                              "replaces --replicas)")
    cluster.add_argument("--decode-replicas", type=int, default=0,
                         help="replicas that a request's KV moves to once its first token exists")
    cluster.add_argument("--migration", choices=["on", "off"], default="off",
                         help="move running requests from the busiest replica to the idlest when they differ "
                              "by --migration-threshold requests or more")
    cluster.add_argument("--migration-threshold", type=int, default=2, help="see --migration")
    cluster.add_argument("--kv-transfer-dtype", choices=["auto", "int8"], default="auto",
                         help="KV moved between replicas: in the cache's dtype (auto), or int8-compressed "
                              "(about half the bytes; lossy, so a greedy stream may differ after a move)")
    cluster.add_argument("--kv-transport", choices=["relay", "object-store", "direct"], default="object-store",
                         help="how moved KV travels: relayed by the front end over the replicas' sockets, through "
                              "Ray's object store, or directly through shared memory between replicas of one host "
                              "(relay between hosts); see BENCHMARKS.md section 12")
    cluster.add_argument("--ray-dashboard", action="store_true", help="start the local Ray's dashboard (loopback)")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)


def parse_router_options(items: list[str]) -> dict[str, float]:
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            options[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SystemExit(f"--router-option: expected NAME=NUMBER, got {item!r}")
    return options


def parse_lora_modules(items: list[str], served_model_name: str) -> list[tuple[str, str]]:
    """--lora-modules values: name=path, or JSON {"name", "path", "base_model_name"} (vLLM's forms)."""
    import json

    modules = []
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = spec["name"], spec["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: expected JSON with name and path, got {item!r}") from None
            base = spec.get("base_model_name")
            if base is not None and base != served_model_name:
                raise ValueError(f"--lora-modules: {name!r} is an adapter of {base!r}, this server serves "
                                 f"{served_model_name!r}")
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules: expected NAME=PATH, got {item!r}")
        modules.append((name, path))
    return modules


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from punctual.engine_args import engine_kwargs
    from punctual.config import ClusterConfig, EngineConfig
    from punctual.server.app import build_app
    from punctual.server.auth import load_api_keys
    from punctual.server.config import ServerConfig

    env_key = os.environ.get("PUNCTUAL_API_KEY")
    try:
        api_keys = load_api_keys(args.api_key or ([env_key] if env_key else []), args.api_key_file)
        server_config = ServerConfig(
            served_model_name=args.served_model_name or args.model, api_keys=api_keys,
            prefix_cache_isolation=args.prefix_cache_isolation,
            max_queue_len=args.max_queue_len, ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms,
            shutdown_timeout_s=args.shutdown_timeout,
            lora_modules=parse_lora_modules(args.lora_modules, args.served_model_name or args.model))
        if server_config.lora_modules and not args.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
    except ValueError as exc:
        raise SystemExit(f"punctual serve: {exc}") from None
    engine_config = EngineConfig.from_kwargs(args.model, check_integrity=args.check_integrity, **engine_kwargs(args))
    replicas = args.prefill_replicas + args.decode_replicas if args.prefill_replicas or args.decode_replicas \
        else args.replicas
    cluster = ClusterConfig(replicas=replicas, threads_per_replica=args.threads_per_replica,
                            num_gpus_per_replica=args.gpus_per_replica, ray_address=args.ray_address,
                            router=args.router, ray_dashboard=args.ray_dashboard,
                            router_options=parse_router_options(args.router_option),
                            prefill_replicas=args.prefill_replicas, decode_replicas=args.decode_replicas,
                            migration=args.migration == "on", migration_threshold=args.migration_threshold,
                            kv_transfer_int8=args.kv_transfer_dtype == "int8", kv_transport=args.kv_transport)
    cluster.validate()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if engine_config.model.device in ("auto", "cpu"):  # which kernel the fused CPU paths run per batch size
        from punctual.kernels import tune_table

        logging.getLogger("punctual.serve").info("%s", tune_table.summary())
    app = build_app(engine_config, server_config, cluster)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn stops gracefully on SIGTERM, then re-raises the signal under the handler it found at
    # start; a no-op one there makes a clean shutdown exit 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl+C, re-raised the same way once the shutdown is done
        pass
    return 0 if server.started else 1
