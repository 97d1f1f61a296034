"""Offline engine benchmark: Punctual vs transformers' generate, side by side in one run.

1. Single-stream decode tokens/s, against the memory-bandwidth limit (weight bytes read per
   token over the bandwidth this machine measures with a large torch reduction).
2. Offline throughput (output tokens/s) for N requests with ShareGPT-like lengths (lognormal,
   mean prompt ~160 and mean output ~200 tokens), Punctual's continuous batching against
   transformers' static batches (left-padded, each batch runs to its longest output).
3. With --step-kinds: where the throughput run's time went, per kind of step (steps carrying
   prompt chunks, decode-only steps by batch size): each step's wall time, the runner's share of
   it, and the step's own bound (its FLOPs at the matmul peak or its weight + KV bytes at the
   bandwidth, whichever is slower), so a shortfall against the step bound has a measured reason.

    python benchmarks/bench_offline.py --model builtin --dtype bfloat16 --runs 3
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import torch


def sharegpt_like_lengths(count: int, seed: int, prompt_mean: float = 160, output_mean: float = 200,
                          sigma: float = 0.8, max_len: int = 900) -> list[tuple[int, int]]:
    """Lognormal prompt and output lengths with the given means (ShareGPT's are long-tailed)."""
    rng = random.Random(seed)

    def draw(mean: float) -> int:
        mu = math.log(mean) - sigma ** 2 / 2
        return max(4, min(max_len, int(rng.lognormvariate(mu, sigma))))

    return [(draw(prompt_mean), draw(output_mean)) for _ in range(count)]


def random_prompt(length: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(length)]


def measure_bandwidth_gbs(repeats: int = 5) -> float:
    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
    data.sum()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def measure_matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The machine's matmul peak in this dtype, measured now: the best of a few size^3 GEMMs."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def token_flops(arch) -> tuple[int, int, int]:
    """FLOPs of one token: through the layers' linears (2 per weight), its attention per context
    position (2 x 2 x heads x head_dim per layer: scores and the weighted sum), and the LM head."""
    hidden, heads, kv_heads, dim = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    per_layer = hidden * (heads + 2 * kv_heads) * dim + heads * dim * hidden + 3 * hidden * arch.intermediate_size
    return 2 * per_layer * arch.num_layers, 4 * heads * dim * arch.num_layers, 2 * hidden * arch.vocab_size


def workload_gflop(arch, workload) -> float:
    """FLOPs the workload needs at the least: every prompt and output token through the layers'
    linears and attention, and the LM head once per output token. The last output token is never fed."""
    linear, attention, head = token_flops(arch)
    total = 0.0
    for prompt, output in workload:
        fed = prompt + output - 1
        total += linear * fed
        total += attention * fed * (fed + 1) / 2  # token i attends to i + 1 positions
        total += head * output
    return total / 1e9


def step_bound_s(arch, workload, peak_gflops: float, bandwidth_gbs: float, weights: int,
                 kv_bytes_per_token: int) -> float:
    """The least time any engine needs for the workload on this machine, step by step: every
    prompt at the matmul peak, then decode steps in which all requests still decoding run
    together (the batch shrinks as outputs end: lognormal lengths leave a long tail of small
    batches), each step bounded by the slower of its FLOPs at the peak and its bytes (the
    weights once, every active request's KV) at the bandwidth. The compute roofline ignores
    that small batches are bandwidth-bound; this bound does not."""
    linear, attention, head = token_flops(arch)
    prefill = sum(linear * p + attention * p * (p + 1) / 2 + head for p, _ in workload)
    total = prefill / (peak_gflops * 1e9)
    for step in range(1, max(o for _, o in workload)):
        contexts = [p + step for p, o in workload if o > step]  # the token fed attends to p + step positions
        flops = len(contexts) * (linear + head) + sum(attention * c for c in contexts)
        data = weights + kv_bytes_per_token * sum(contexts)
        total += max(flops / (peak_gflops * 1e9), data / (bandwidth_gbs * 1e9))
    return total


def weight_bytes(model) -> int:
    from punctual.models.linear import FusedWeight
    from punctual.kernels.quant import QuantizedWeight

    tensors = {id(t): t for t in [model.embed, model.norm, model.lm_head] if isinstance(t, torch.Tensor)}
    for layer in [model, *model.layers]:
        for t in vars(layer).values():
            if isinstance(t, FusedWeight):  # the decode path reads the packed copy only
                t = t.packed
            elif isinstance(t, QuantizedWeight):
                t = t.data
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                tensors[id(t)] = t
    # The embedding table is read one row per token; the LM head reads its whole matrix.
    total = sum(t.numel() * t.element_size() for t in tensors.values() if t is not model.cos and t is not model.sin)
    if model.lm_head is not model.embed:
        total -= model.embed.numel() * model.embed.element_size()
    return total


def punctual_single_stream(llm, vocab: int, new_tokens: int) -> float:
    from punctual import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompt = {"prompt_token_ids": random_prompt(32, vocab, random.Random(0))}
    engine = llm.engine
    engine.add_request("single", prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    decode = steps[1:]  # the first step is the prefill
    return len(decode) / sum(decode)


def hf_single_stream(model, vocab: int, new_tokens: int) -> float:
    prompt = torch.tensor([random_prompt(32, vocab, random.Random(0))])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return (new_tokens - 1) / (time.perf_counter() - start - prefill)


STEP_KINDS = ("prompt chunks", "decode 1-4", "decode 5-16", "decode 17-64", "decode 65+")


def step_kind(plan) -> str:
    if plan.num_prompt_tokens:
        return STEP_KINDS[0]
    rows = len(plan.scheduled)
    return next(kind for kind, top in zip(STEP_KINDS[1:], (4, 16, 64, math.inf)) if rows <= top)


class StepKindRecorder:
    """Times every engine step and its runner call, and prices the step's own bound: installed on
    one engine core for the throughput run (instance attributes shadow the methods)."""

    def __init__(self, core, arch, peak_gflops: float, bandwidth_gbs: float, weights: int, kv_bytes_per_token: int):
        self.core, self.rows = core, []
        linear, attention, head = token_flops(arch)
        runner_execute, core_step = core.runner.execute, core.step
        self._last = None

        def execute(plan):
            start = time.perf_counter()
            out = runner_execute(plan)
            elapsed = time.perf_counter() - start
            if plan.scheduled:
                tokens = plan.num_batched_tokens
                # Token i of a chunk starting at position s attends to s + i + 1 positions.
                attended = sum(len(s.token_ids) * s.start_position + len(s.token_ids) * (len(s.token_ids) + 1) // 2
                               for s in plan.scheduled)
                contexts = sum(s.start_position + len(s.token_ids) for s in plan.scheduled)
                flops = tokens * linear + attended * attention + plan.num_sampled_rows * head
                data = weights + kv_bytes_per_token * contexts
                bound = max(flops / (peak_gflops * 1e9), data / (bandwidth_gbs * 1e9))
                self._last = [step_kind(plan), elapsed, bound, flops / (peak_gflops * 1e9) >= data / (bandwidth_gbs * 1e9)]
            return out

        def step():
            self._last = None
            start = time.perf_counter()
            outputs = core_step()
            if self._last is not None:
                self.rows.append((*self._last, time.perf_counter() - start))
            return outputs

        core.runner.execute, core.step = execute, step

    def uninstall(self) -> None:
        del self.core.runner.execute, self.core.step

    def table(self) -> list[dict]:
        out = []
        for kind in STEP_KINDS:
            rows = [r for r in self.rows if r[0] == kind]
            if not rows:
                continue
            step_s, runner_s, bound_s = (sum(r[i] for r in rows) for i in (4, 1, 2))
            out.append({"kind": kind, "steps": len(rows), "step_s": step_s, "runner_s": runner_s, "bound_s": bound_s,
                        "compute_bound_steps": sum(r[3] for r in rows),
                        "fraction_of_bound": bound_s / step_s, "runner_fraction_of_bound": bound_s / runner_s})
        return out


def print_step_kinds(table: list[dict]) -> None:
    total = sum(r["step_s"] for r in table)
    print("| step kind | steps | share of time | step s | runner s | outside runner | bound s | bound/step | bound/runner | compute-bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['kind']} | {r['steps']} | {100 * r['step_s'] / total:.0f}% | {r['step_s']:.2f} | {r['runner_s']:.2f} "
              f"| {100 * (1 - r['runner_s'] / r['step_s']):.0f}% | {r['bound_s']:.2f} | {100 * r['fraction_of_bound']:.0f}% "
              f"| {100 * r['runner_fraction_of_bound']:.0f}% | {r['compute_bound_steps']}/{r['steps']} |", flush=True)


def punctual_throughput(llm, workload, vocab: int, seed: int = 1) -> float:
    from punctual import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": random_prompt(p, vocab, rng)} for p, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in workload]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(o for _, o in workload)
    return produced / elapsed


def hf_throughput(model, workload, vocab: int, batch_size: int) -> float:
    rng = random.Random(1)
    prompts = [random_prompt(p, vocab, rng) for p, _ in workload]
    start = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = prompts[i:i + batch_size]
        longest_prompt = max(map(len, batch))
        ids = torch.tensor([[0] * (longest_prompt - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (longest_prompt - len(p)) + [1] * len(p) for p in batch])
        new = max(o for _, o in workload[i:i + batch_size])
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return sum(o for _, o in workload) / elapsed  # only tokens a user asked for count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement; the median is reported")
    parser.add_argument("--throughput-runs", type=int, default=None,
                        help="runs of the 256-request throughput test (default: --runs); transformers' take minutes")
    parser.add_argument("--single-stream-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true", help="plain PyTorch ops (no fused CPU kernels)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or int8")
    parser.add_argument("--step-kinds", action="store_true",
                        help="after the throughput runs, one more run timed step by step: time and bound per step kind")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()

    from punctual import LLM
    from punctual.checkpoints.loader import resolve_model_path

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory="3GiB",
              enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype)
    model = llm.engine.core.runner.model
    vocab = llm.engine.core.vocab_size
    results: dict = {"model": args.model, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
                     "threads": torch.get_num_threads(),
                     "num_requests": args.num_requests, "runs": args.runs}
    bandwidth = measure_bandwidth_gbs()
    bytes_per_token = weight_bytes(model)
    from punctual.kernels import cpu_kernels, tune_table

    cpu_kernels.load()
    from punctual.bench.machine import cpu_line

    results["machine"] = {"cpu": cpu_line(), "kernels": tune_table.summary(), "kernel_build": cpu_kernels.loaded_variant()}
    results["bandwidth_gbs"] = bandwidth
    results["weight_bytes_per_token"] = bytes_per_token
    results["bandwidth_limit_tok_s"] = bandwidth * 1e9 / bytes_per_token

    hf = None
    if not args.skip_hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(resolve_model_path(args.model)), dtype=getattr(torch, args.dtype)).eval()

    punctual_single_stream(llm, vocab, 8)  # warm-up
    results["punctual_single_stream_tok_s"] = statistics.median(
        punctual_single_stream(llm, vocab, args.single_stream_tokens) for _ in range(args.runs))
    if hf is not None:
        with torch.inference_mode():
            results["hf_single_stream_tok_s"] = statistics.median(
                hf_single_stream(hf, vocab, args.single_stream_tokens) for _ in range(args.runs))
    print(json.dumps(results, indent=2), flush=True)

    if not args.skip_throughput:
        workload = sharegpt_like_lengths(args.num_requests, seed=0)
        results["mean_prompt_tokens"] = statistics.mean(p for p, _ in workload)
        results["mean_output_tokens"] = statistics.mean(o for _, o in workload)
        throughput_runs = args.throughput_runs or args.runs
        results["throughput_runs"] = throughput_runs
        results["punctual_throughput_tok_s"] = statistics.median(
            punctual_throughput(llm, workload, vocab) for _ in range(throughput_runs))
        print("punctual throughput", results["punctual_throughput_tok_s"], flush=True)
        # The compute roofline, in this run: the workload's FLOPs at the matmul peak measured now.
        peak = measure_matmul_peak_gflops(getattr(torch, args.dtype))
        gflop = workload_gflop(llm.engine.core.runner.arch, workload)
        elapsed = sum(o for _, o in workload) / results["punctual_throughput_tok_s"]
        results["matmul_peak_gflops"] = peak
        results["workload_gflop"] = gflop
        results["roofline_s"] = gflop / peak
        results["punctual_fraction_of_roofline"] = gflop / peak / elapsed
        print(f"roofline: {gflop:.0f} GFLOP at {peak:.0f} GFLOP/s = {gflop / peak:.2f} s; Punctual took "
              f"{elapsed:.2f} s = {100 * gflop / peak / elapsed:.0f}% of the roofline", flush=True)
        arch, runner = llm.engine.core.runner.arch, llm.engine.core.runner
        kv_bytes = runner.kv_bytes_per_block // runner.block_size  # all layers' K and V (int8: with scales)
        bound = step_bound_s(arch, workload, peak, bandwidth, bytes_per_token, kv_bytes)
        results["step_bound_s"] = bound
        results["roofline_fraction_reachable"] = gflop / peak / bound
        results["punctual_fraction_of_step_bound"] = bound / elapsed
        if args.step_kinds:
            recorder = StepKindRecorder(llm.engine.core, arch, peak, bandwidth, bytes_per_token, kv_bytes)
            punctual_throughput(llm, workload, vocab, seed=2)  # other prompts: none in the prefix cache
            recorder.uninstall()
            results["step_kinds"] = recorder.table()
            print_step_kinds(results["step_kinds"])
        print(f"step-by-step bound (each step at the slower of its FLOPs and its weight + KV bytes): {bound:.2f} s, "
              f"so at most {100 * gflop / peak / bound:.0f}% of the roofline is reachable on this workload; "
              f"Punctual is at {100 * bound / elapsed:.0f}% of that bound", flush=True)
        if hf is not None:
            with torch.inference_mode():
                results["hf_throughput_tok_s"] = statistics.median(
                    hf_throughput(hf, workload, vocab, args.hf_batch_size) for _ in range(throughput_runs))
            results["throughput_ratio"] = results["punctual_throughput_tok_s"] / results["hf_throughput_tok_s"]
    results["single_stream_vs_bandwidth_limit"] = (results["bandwidth_limit_tok_s"]
                                                   / results["punctual_single_stream_tok_s"])
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
