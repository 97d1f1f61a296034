"""Does torch.compile (inductor's CPU C++ code) make the decode step faster? A probe, not a mode.

The whole `LlamaModel.forward` of pure-decode steps is compiled (dynamic shapes), so RMSNorm,
RoPE, the residual adds, SiLU*mul and the attention bookkeeping fuse into generated kernels.
oneDNN's packed weights are opaque tensors that inductor cannot trace ("Cannot access storage
of OpaqueTensorImpl"), so each linear goes through a custom op that looks its weight up by
handle and runs Punctual's own `linear` (packed bf16, or the int8/int4 kernels). Steps with a
prompt chunk stay eager. Rounds alternate eager and compiled on the same engine; times are the
process's CPU time per step (less sensitive than wall time to other work on a shared machine).

    python benchmarks/bench_compile_probe.py --model builtin --threads 1
    python benchmarks/bench_compile_probe.py --cpp-wrapper   # inductor's C++ wrapper instead of Python

The inductor caches go under ~/.cache/punctual/inductor, so a second run compiles from disk.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch

CACHE_DIR = Path.home() / ".cache" / "punctual" / "inductor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpp-wrapper", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
    if args.threads:
        torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    import punctual.models.decoder as llama
    from punctual import LLM, SamplingParams

    inductor_config.cpp_wrapper = args.cpp_wrapper
    llm = LLM(args.model, dtype="bfloat16", quantization=args.quantization, kv_cache_memory="1GiB",
              max_num_batched_tokens=2048)
    engine, scheduler, model = llm.engine, llm.engine.core.scheduler, llm.engine.core.runner.model
    eager_linear = llama.linear
    weights = {}
    for weight in [getattr(layer, name) for layer in model.layers for name in ("qkv", "o_proj", "gate_up", "down")
                   ] + [model.lm_head]:
        weights[id(weight)] = weight

    @torch.library.custom_op("punctual_probe::linear", mutates_args=())
    def linear_op(x: torch.Tensor, handle: int) -> torch.Tensor:
        return eager_linear(x, weights[handle])

    @linear_op.register_fake
    def _(x, handle):
        return x.new_empty(x.shape[0], weights[handle].size(0))

    def routed(x, weight, bias=None, single_row_mv=False):
        out = torch.ops.punctual_probe.linear(x, id(weight))
        return out if bias is None else out + bias

    forward = type(model).forward.__wrapped__  # without its inference_mode decorator
    compiled = torch.compile(forward, dynamic=True)
    eager_forward = model.forward
    use_compiled = [False]

    def dispatch(input_ids, positions, meta, caches):
        if use_compiled[0] and meta.num_decode_tokens == input_ids.shape[0] and all(
                b.q_len == 1 for b in meta.decode_buckets):
            llama.linear = routed
            try:
                with torch.inference_mode():
                    return compiled(model, input_ids, positions, meta, caches)
            finally:
                llama.linear = eager_linear
        return eager_forward(input_ids, positions, meta, caches)

    model.forward = dispatch
    rng = random.Random(0)
    vocab = engine.core.vocab_size
    print(f"{args.model}, {torch.get_num_threads()} threads, quantization {args.quantization}, "
          f"cpp_wrapper {args.cpp_wrapper}; CPU ms per decode step, median of {args.steps}")
    print("| streams | first compiled step (compile), s | eager ms (rounds) | compiled ms (rounds) | compiled/eager |")
    print("|---|---|---|---|---|")
    for streams in args.streams:
        ids = [f"{streams}-{i}" for i in range(streams)]
        for request_id in ids:
            engine.add_request(request_id, {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(100)]},
                               SamplingParams(temperature=0, max_tokens=2 * args.rounds * (args.steps + 1) + 8,
                                              ignore_eos=True))
        while scheduler.waiting or any(r.is_prefilling or r.num_output_tokens == 0 for r in scheduler.running):
            engine.step()
        times = {False: [], True: []}
        compile_s = None
        for _ in range(args.rounds):
            for mode in (True, False):
                use_compiled[0] = mode
                start = time.perf_counter()
                engine.step()
                if mode and compile_s is None:
                    compile_s = time.perf_counter() - start
                step_times = []
                for _ in range(args.steps):
                    start = time.process_time()
                    engine.step()
                    step_times.append(time.process_time() - start)
                times[mode].append(statistics.median(step_times) * 1e3)
        for request_id in ids:
            engine.abort_request(request_id)
        eager, comp = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {streams} | {compile_s:.1f} | {eager:.2f} ({', '.join(f'{t:.1f}' for t in times[False])}) | "
              f"{comp:.2f} ({', '.join(f'{t:.1f}' for t in times[True])}) | {comp / eager:.2f} |", flush=True)


if __name__ == "__main__":
    main()
