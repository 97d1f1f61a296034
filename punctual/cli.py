"""The `punctual` command: generate, serve, bench, demo."""
from __future__ import annotations

import argparse
import sys

from punctual.engine_args import add_engine_args, engine_kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    from punctual import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    # Flags left out take the checkpoint's defaults (generation_config.json); greedy where it has none.
    sampling = {"temperature": 0.0, **llm.generation_defaults}
    sampling.update({name: getattr(args, name) for name in ("temperature", "top_p", "top_k")
                     if getattr(args, name) is not None})
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.sampling_seed, n=args.n, stop=args.stop or None,
                            ignore_eos=args.ignore_eos, **sampling)
    outputs = llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1)
    for output in outputs:
        for sample in output.outputs:
            print(f"--- prompt: {output.prompt!r} [{sample.finish_reason}, {len(sample.token_ids)} tokens]")
            print(output.prompt + sample.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="punctual", description="A latency-first LLM serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    gen.add_argument("--model", default="builtin",
                     help="checkpoint directory, .gguf file, or builtin / builtin-tiny / smollm2")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=32)
    # Sampling flags left out: the checkpoint's generation_config.json, else greedy.
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--sampling-seed", type=int, default=None, help="seed of the request's sampler")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    try:
        from punctual.server.cli import add_serve_parser
    except ImportError:
        pass
    else:
        add_serve_parser(sub)
    try:
        from punctual.bench.cli import add_bench_parsers
    except ImportError:
        pass
    else:
        add_bench_parsers(sub)
    try:
        from punctual.sim.cli import add_sim_parser
    except ImportError:
        pass
    else:
        add_sim_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"punctual: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
