"""The engine's per-step work outside the model forward, at 64 sequences, short and long contexts.

The model's forward and logits are replaced by stubs that return zeros of the right shape, so a
step's time is everything else the engine core does: scheduling, block bookkeeping, prefix
hashing, speculation's proposals, the runner's input tensors and attention metadata, sampling,
building the outputs. (Detokenizing is the front end's, in another process, and not timed.) That work should
grow with the batch, not with how long each sequence's context is.

    python benchmarks/bench_step_overhead.py [--contexts 128,4096] [--seqs 64] [--steps 100] [--runs 5]
                                             [--hash-algo sha256|builtin] [--hash-only]

It first prints the prefix cache's block hashing alone, sha256 against builtin, for the blocks a
decode step and a full prefill step hash (--hash-only: nothing else).

Runs against whatever `punctual` is importable (PYTHONPATH selects a tree), so two commits can be
compared side by side.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 2048
OUTPUT_ROOM = 2048  # tokens each sequence may generate during the run


def build_checkpoint(path: Path, max_positions: int) -> Path:
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=max_positions, eos_token_id=None,
                                      bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    from punctual.checkpoints.builtin import builtin_path

    for file in ("tokenizer.json", "tokenizer_config.json"):  # builtin-tiny's: the same 2048-token vocabulary
        shutil.copy(builtin_path("builtin-tiny") / file, path / file)
    return path


def stub_model(runner) -> None:
    """Forward and logits that cost (almost) nothing: zeros of the right shapes."""
    hidden = runner.arch.hidden_size
    vocab = runner.arch.vocab_size

    def forward(input_ids, positions, meta, kv_caches):
        return torch.zeros(input_ids.shape[0], hidden)

    def logits(hidden_states):
        return torch.zeros(hidden_states.shape[0], vocab)

    runner.model.forward = forward
    runner.model.logits = logits


def hash_cost(algo: str, num_blocks: int, block_size: int = 16, repeats: int = 200) -> float:
    """Median seconds to hash `num_blocks` new full blocks (one chain, as a prompt's), under `algo`."""
    from punctual.kv.block_pool import extend_block_hashes

    tokens = torch.randint(1, VOCAB, (num_blocks * block_size,), generator=torch.Generator().manual_seed(0)).tolist()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        extend_block_hashes([], tokens, block_size, num_blocks, algo=algo)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def report_hash_cost(num_seqs: int, budget: int = 8192, block_size: int = 16) -> None:
    """Per step: a decode step of `num_seqs` fills num_seqs / block_size blocks on average; a
    prefill step of `budget` tokens fills budget / block_size."""
    for label, blocks in ((f"decode step, {num_seqs} seqs", max(1, num_seqs // block_size)),
                          (f"prefill step, {budget} tokens", budget // block_size)):
        costs = {algo: hash_cost(algo, blocks, block_size) for algo in ("builtin", "sha256")}
        print(f"block hashing, {label} ({blocks} blocks): "
              + ", ".join(f"{algo} {cost * 1e6:8.1f} us/step" for algo, cost in costs.items())
              + f"; sha256 / builtin {costs['sha256'] / costs['builtin']:.2f}x")


def measure(checkpoint: Path, context: int, num_seqs: int, num_steps: int, speculative: bool,
            hash_algo: str = "sha256") -> float:
    """Median seconds per decode step, 64 sequences each holding about `context` tokens."""
    from punctual import SamplingParams
    from punctual.config import EngineConfig
    from punctual.engine.core import EngineCore
    from punctual.request import EngineCoreRequest

    block_size = 16
    # Room to generate while others prefill (with speculation, up to 5 tokens a step).
    max_tokens = OUTPUT_ROOM
    blocks = num_seqs * (-(-(context + max_tokens) // block_size)) + 16
    kwargs = dict(dtype="float32", max_num_seqs=num_seqs, max_num_batched_tokens=8192, num_kv_blocks=blocks,
                  block_size=block_size, prefix_caching_hash_algo=hash_algo)
    if speculative:
        kwargs.update(speculative_method="ngram", num_speculative_tokens=4)
    core = EngineCore(EngineConfig.from_kwargs(str(checkpoint), **kwargs))  # the core alone: no detokenizing
    stub_model(core.runner)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    generator = torch.Generator().manual_seed(context)
    for i in range(num_seqs):
        prompt = torch.randint(1, VOCAB, (context,), generator=generator).tolist()
        core.add_request(EngineCoreRequest(f"r{i}", prompt, params))
    while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        core.step()  # prefill, untimed
    times = []
    for _ in range(num_steps):
        started = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - started)
    assert core.scheduler.num_running == num_seqs, "every sequence must still be decoding"
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="128,4096")
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hash-algo", default="sha256", choices=["sha256", "builtin"],
                        help="the prefix cache's block hash in the step measurements")
    parser.add_argument("--hash-only", action="store_true", help="print the block-hashing costs only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report_hash_cost(args.seqs)
    if args.hash_only:
        return
    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp) / "ckpt", max(contexts) + OUTPUT_ROOM + 64)
        for speculative in (False, True):
            results: dict[int, list[float]] = {c: [] for c in contexts}
            for _ in range(args.runs):  # interleaved, so drift on a shared machine hits both alike
                for context in contexts:
                    results[context].append(measure(checkpoint, context, args.seqs, args.steps, speculative,
                                                    args.hash_algo))
            label = "ngram speculation" if speculative else "no speculation"
            medians = {c: statistics.median(v) for c, v in results.items()}
            for context in contexts:
                print(f"{label:18s} {args.seqs} seqs, context {context:5d}: {medians[context] * 1e3:7.3f} ms/step "
                      f"(median of {args.runs} runs x {args.steps} steps; runs "
                      f"{', '.join(f'{x * 1e3:.2f}' for x in results[context])})")
            base = medians[contexts[0]]
            for context in contexts[1:]:
                print(f"{label:18s} ratio context {context} / {contexts[0]}: {medians[context] / base:.3f}")


if __name__ == "__main__":
    main()
