"""Engine arguments: the flags every command that builds an engine shares (`punctual generate`,
`serve`, `sim calibrate`, and the engine flags `sim validate` reads from --serve-args), each with
the keyword of LLM(...) / EngineConfig.from_kwargs it sets. One table, so that a flag and its
keyword cannot drift apart; names follow vLLM. The library's full keyword set is config.py's
fields (EngineConfig.from_kwargs names an unknown one); these are the ones a CLI exposes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from punctual.config import parse_size


def _size(value: str) -> str:
    """argparse's check of a size flag: the error names the flag (argparse adds it)."""
    try:
        parse_size(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("memory size: ")) from None
    return value


@dataclass(frozen=True)
class EngineArg:
    flag: str  # e.g. --max-num-seqs
    options: dict = field(default_factory=dict)  # argparse.add_argument keywords (default None unless given)

    @property
    def keyword(self) -> str:
        """The LLM(...) / EngineConfig.from_kwargs keyword: the flag's name in snake case."""
        return self.flag.removeprefix("--").replace("-", "_")


ENGINE_ARGS: tuple[EngineArg, ...] = (
    EngineArg("--dtype", dict(default="auto", choices=["auto", "float32", "bfloat16", "float16"])),
    EngineArg("--device", dict(default="auto", help="auto | cpu | cuda")),
    EngineArg("--quantization", dict(choices=["none", "int8", "int4"],
                                     help="weight-only quantization of the linears (CPU): int8 per channel, "
                                          "int4 in groups of 32")),
    EngineArg("--enforce-eager", dict(action="store_true", default=None,
                                      help="plain PyTorch ops only: no fused CPU kernels (bf16 on AVX-512 BF16 "
                                           "uses them otherwise)")),
    EngineArg("--batch-invariant", dict(action="store_true", default=None,
                                        help="bf16 output independent of batching, chunking and speculation "
                                             "(fused kernels, fixed order)")),
    EngineArg("--cuda-graph-max-batch-size", dict(type=int, help="CUDA: decode steps of up to this many requests "
                                                                 "replay captured CUDA graphs (default 64, 0: none)")),
    EngineArg("--tensor-parallel-size", dict(type=int, help="split the model's heads, MLP columns and vocabulary "
                                                            "across this many rank processes on this host, or "
                                                            "placed by Ray with --replicas and --ray-address (CPU; "
                                                            "default 1)")),
    EngineArg("--threads-per-rank", dict(type=int, help="torch threads of each tensor-parallel rank (default: "
                                                        "this machine's cores / --tensor-parallel-size; with "
                                                        "--replicas: --threads-per-replica)")),
    EngineArg("--max-weight-memory", dict(type=_size, help="bytes of weights kept resident, e.g. 2GB, 512MB, 1.5GiB "
                                                           "(default: all); beyond it a sliding window of layers is "
                                                           "read from the checkpoint ahead of use; per rank with "
                                                           "--tensor-parallel-size")),
    EngineArg("--max-num-seqs", dict(type=int, help="sequences per step")),
    EngineArg("--max-num-batched-tokens", dict(type=int, help="token budget per step")),
    EngineArg("--kv-cache-memory", dict(help="bytes for the KV pool, e.g. 2GiB")),
    EngineArg("--block-size", dict(type=int, help="tokens per KV block")),
    EngineArg("--max-model-len", dict(type=int)),
    EngineArg("--scheduling-policy", dict(help="fcfs | priority | slo | fair | sjf")),
    EngineArg("--slo-overload-action", dict(choices=["reject", "best_effort"],
                                            help="slo policy: what to do with a request that can no longer meet "
                                                 "its TTFT")),
    EngineArg("--seed", dict(type=int)),
    EngineArg("--kv-cache-dtype", dict(help="auto | int8 (quantized KV, ~2x the tokens of bf16)")),
    EngineArg("--speculative-method", dict(choices=["ngram", "draft"])),
    EngineArg("--speculative-model", dict(help="draft checkpoint (method draft)")),
    EngineArg("--num-speculative-tokens", dict(type=int, help="most tokens proposed per step")),
    EngineArg("--speculative-length", dict(choices=["fixed", "adaptive"])),
    EngineArg("--enable-prefix-caching", dict(action=argparse.BooleanOptionalAction, default=None,
                                              help="reuse the KV of shared prefixes (on by default)")),
    EngineArg("--kv-tier-memory", dict(help="bytes of a second tier for evicted prefix blocks, e.g. 4GiB "
                                            "(off by default)")),
    EngineArg("--kv-tier-dtype", dict(choices=["auto", "int8", "cache"],
                                      help="auto: int8 (compressed) on CPU, the cache's format on CUDA")),
    EngineArg("--prefix-caching-hash-algo", dict(choices=["sha256", "builtin"],
                                                 help="block hashes of the prefix cache: sha256 (default; collision "
                                                      "resistant) or builtin (Python's hash: cheaper, but a crafted "
                                                      "prompt can reuse another's KV)")),
    EngineArg("--attention-sinks", dict(type=int, help="StreamingLLM: keep a request's first N tokens in the KV "
                                                       "cache beside --streaming-window (default 0)")),
    EngineArg("--streaming-window", dict(type=int, help="StreamingLLM: keep the most recent W tokens (whole "
                                                        "blocks) and evict older ones past the sinks, so a "
                                                        "request may run past --max-model-len (off by default)")),
    EngineArg("--sparse-attention", dict(choices=["quest"],
                                         help="sparse decode attention (Quest): each long decode attends only over "
                                              "the KV blocks its query scores highest (off by default)")),
    EngineArg("--sparse-token-budget", dict(type=int, help="quest: tokens a decode attends per layer (default 1024; "
                                                           "the first and last blocks are always kept)")),
    EngineArg("--sparse-min-context", dict(type=int, help="quest: below this context attention stays dense "
                                                          "(default 2048)")),
    EngineArg("--enable-lora", dict(action="store_true", default=None,
                                    help="serve LoRA adapters (PEFT format) of the model, batched with it in every step")),
    EngineArg("--max-loras", dict(type=int, help="distinct LoRA adapters in one step (default 1)")),
    EngineArg("--max-lora-rank", dict(type=int, help="highest LoRA rank accepted (default 16)")),
    EngineArg("--max-cpu-loras", dict(type=int, help="LoRA adapters kept loaded in memory (LRU; default --max-loras)")),
)
_BY_FLAG = {arg.flag: arg for arg in ENGINE_ARGS}


def add_engine_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                    only: tuple[str, ...] | None = None) -> None:
    """Add the engine flags (`only`: these flags, in this order) to a parser or an argument group."""
    for arg in ENGINE_ARGS if only is None else [_BY_FLAG[flag] for flag in only]:
        parser.add_argument(arg.flag, **{"default": None, **arg.options})


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The LLM(...) / EngineConfig.from_kwargs keywords of parsed engine flags (None: the default)."""
    return {arg.keyword: getattr(args, arg.keyword) for arg in ENGINE_ARGS}
