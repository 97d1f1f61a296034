"""The `punctual` command: generate, serve, bench, demo."""
from __future__ import annotations

import argparse
import sys


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options shared by every command that builds an engine (names follow vLLM)."""
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--quantization", default=None, choices=["none", "int8", "int4"],
                        help="weight-only quantization of the linears (CPU): int8 per channel, int4 in groups of 32")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="plain PyTorch ops only: no fused CPU kernels (bf16 on AVX-512 BF16 uses them otherwise)")
    parser.add_argument("--batch-invariant", action="store_true", default=None,
                        help="bf16 output independent of batching, chunking and speculation (fused kernels, fixed order)")
    parser.add_argument("--cuda-graph-max-batch-size", type=int, default=None,
                        help="CUDA: decode steps of up to this many requests replay captured CUDA graphs (default 64, 0: none)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    parser.add_argument("--kv-cache-memory", default=None, help="bytes for the KV pool, e.g. 2GiB")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--scheduling-policy", default=None, help="fcfs | priority | slo | fair | sjf")
    parser.add_argument("--slo-overload-action", default=None, choices=["reject", "best_effort"],
                        help="slo policy: what to do with a request that can no longer meet its TTFT")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kv-cache-dtype", default=None, help="auto | int8 (quantized KV, ~2x the tokens of bf16)")
    parser.add_argument("--speculative-method", default=None, choices=["ngram", "draft"])
    parser.add_argument("--speculative-model", default=None, help="draft checkpoint (method draft)")
    parser.add_argument("--num-speculative-tokens", type=int, default=None, help="most tokens proposed per step")
    parser.add_argument("--speculative-length", default=None, choices=["fixed", "adaptive"])
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse the KV of shared prefixes (on by default)")
    parser.add_argument("--kv-tier-memory", default=None,
                        help="bytes of a second tier for evicted prefix blocks, e.g. 4GiB (off by default)")
    parser.add_argument("--kv-tier-dtype", default=None, choices=["auto", "int8", "cache"],
                        help="auto: int8 (compressed) on CPU, the cache's format on CUDA")
    parser.add_argument("--prefix-caching-hash-algo", default=None, choices=["sha256", "builtin"],
                        help="block hashes of the prefix cache: sha256 (default; collision resistant) or "
                             "builtin (Python's hash: cheaper, but a crafted prompt can reuse another's KV)")
    parser.add_argument("--enable-lora", action="store_true", default=None,
                        help="serve LoRA adapters (PEFT format) of the model, batched with it in every step")
    parser.add_argument("--max-loras", type=int, default=None, help="distinct LoRA adapters in one step (default 1)")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="highest LoRA rank accepted (default 16)")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="LoRA adapters kept loaded in memory (LRU; default --max-loras)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, quantization=args.quantization,
                enforce_eager=args.enforce_eager, batch_invariant=args.batch_invariant,
                cuda_graph_max_batch_size=args.cuda_graph_max_batch_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
                block_size=args.block_size, max_model_len=args.max_model_len,
                scheduling_policy=args.scheduling_policy, seed=args.seed,
                enable_prefix_caching=args.enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                slo_overload_action=args.slo_overload_action, speculative_method=args.speculative_method,
                speculative_model=args.speculative_model, num_speculative_tokens=args.num_speculative_tokens,
                speculative_length=args.speculative_length, kv_tier_memory=args.kv_tier_memory,
                kv_tier_dtype=args.kv_tier_dtype, prefix_caching_hash_algo=args.prefix_caching_hash_algo,
                enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                max_cpu_loras=args.max_cpu_loras)


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
