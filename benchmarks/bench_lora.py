"""Multi-LoRA serving on smollm2 (issue 31, item 7): what batching many adapters costs per token.

32 streams decode together, spread over 1, 4, 16 and 64 distinct random rank-16 adapters
(targets q, k, v, o, gate, up, down; built with peft into a temp dir), against the base model
alone and against one adapter merged into the weights (peft's merge_and_unload, saved and served
as a plain checkpoint). Reports TPOT (per request: (finished - first token) / (tokens - 1), mean)
and output tok/s (all tokens over the wall time of the batch, prefill included); one config with
fewer slots than adapters shows the swaps it makes; the time to load an adapter from disk; and,
on two replicas in this process, the swaps and disk reads the router's adapter affinity saves
over round robin.

    python benchmarks/bench_lora.py                      # the figures (~3 minutes)
    python benchmarks/bench_lora.py --streams 4 --tokens 4 --adapters 1,4 --affinity-requests 8   # a smoke run

On CPU a slot is bookkeeping: adapters run from host memory, so a swap copies nothing; its cost
is the requests that wait for a slot (the fewer-slots row), and a disk read when the adapter had
left the loaded set (the load row).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from punctual.bench.machine import cpu_line  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]




def build_adapters(base: Path, out: Path, count: int, rank: int) -> tuple[list[Path], Path]:
    """`count` random PEFT adapters of `base` (rank `rank`, every projection), and the base with
    the first one merged (merge_and_unload), saved as a plain checkpoint."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    paths = []
    for index in range(count):
        torch.manual_seed(index)
        with torch.no_grad():  # random A and B, B kept small: a nudge to the base model, as a fine-tune is
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.normal_(0, 1 / rank ** 0.5)
                elif "lora_B" in name:
                    param.normal_(0, 0.01)
        path = out / f"adapter-{index}"
        model.save_pretrained(path)
        paths.append(path)
        if index == 0:
            merged = out / "merged"
            model.merge_and_unload().save_pretrained(merged)
            # The rest saved in bfloat16: half the bytes to write and read (the served dtype or finer).
            model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                        config)
            for name in os.listdir(base):  # the tokenizer and generation config travel with it
                if name.startswith(("tokenizer", "special_tokens", "generation_config")):
                    shutil.copy(base / name, merged / name)
    return paths, merged


def decode_run(llm, prompts, params, loras) -> dict:
    """One batch to completion: TPOT and tok/s, and the engine's LoRA counters after it."""
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    wall = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    tpots = []
    for o in outputs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        if m is not None and m.first_token_time is not None and m.finished_time is not None and n > 1:
            tpots.append((m.finished_time - m.first_token_time) / (n - 1))
    stats = llm.engine.stats()
    return dict(tpot_ms=1000 * statistics.mean(tpots) if tpots else float("nan"), tok_s=tokens / wall,
                swaps=stats.lora_swaps, loads=stats.lora_loads)


def offline(args, base: Path, adapters: list[Path], merged: Path) -> list[tuple]:
    from punctual import LLM, LoRARequest, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len)] for _ in range(args.streams)]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0)
    common = dict(dtype=args.dtype, max_num_seqs=max(args.streams, 1))
    rows = []

    def measure(label, llm, loras=None):
        decode_run(llm, prompts[:2], params, None if loras is None else loras[:2])  # warm-up
        best = min((decode_run(llm, prompts, params, loras) for _ in range(args.repeats)), key=lambda r: r["tpot_ms"])
        rows.append((label, best))
        print(f"  {label}: TPOT {best['tpot_ms']:.1f} ms, {best['tok_s']:.1f} tok/s", file=sys.stderr)

    measure("base model", LLM(str(base), **common))
    measure("one merged model", LLM(str(merged), **common))
    for count in args.adapters:
        requests = [LoRARequest(f"a{i}", i + 1, str(adapters[i])) for i in range(count)]
        loras = [requests[s % count] for s in range(args.streams)]
        slots = min(count, args.streams)
        llm = LLM(str(base), enable_lora=True, max_loras=slots, max_lora_rank=args.rank, max_cpu_loras=count, **common)
        measure(f"{count} adapters, {slots} slots", llm, loras)
        if count == max(args.adapters):
            few = max(1, slots // 4)
            llm = LLM(str(base), enable_lora=True, max_loras=few, max_lora_rank=args.rank, max_cpu_loras=count, **common)
            measure(f"{count} adapters, {few} slots (swaps)", llm, loras)
    return rows


def load_times(args, base: Path, adapters: list[Path]) -> list[float]:
    """ms to read and check one adapter from disk (the loaded set holds one: every read is cold)."""
    from punctual import LLM, LoRARequest

    llm = LLM(str(base), dtype=args.dtype, enable_lora=True, max_loras=1, max_lora_rank=args.rank, max_cpu_loras=1)
    runner = llm.engine.core.runner
    times = []
    for i in range(min(len(adapters), args.load_samples)):
        started = time.perf_counter()
        runner.load_adapter(LoRARequest(f"l{i}", i + 1, str(adapters[i])))
        times.append(1000 * (time.perf_counter() - started))
    return times


def affinity(args, base: Path, adapters: list[Path]) -> dict[str, dict]:
    """Two replicas in this process, one slot and one loaded adapter each; requests for two adapters
    in runs of two (round robin splits each run across both replicas): swaps and disk reads."""
    import punctual.cluster.launch
    from punctual.cluster.client import ClusterClient
    from punctual.cluster.inprocess import InProcessReplicas
    from punctual.config import ClusterConfig, EngineConfig
    from punctual.lora.request import LoRARequest
    from punctual.request import EngineCoreRequest
    from punctual.sampling_params import SamplingParams

    punctual.cluster.launch.RayReplicas = InProcessReplicas
    loras = [LoRARequest(f"a{i}", i + 1, str(adapters[i])) for i in range(2)]
    results = {}
    for router in ("cache_aware", "round_robin"):
        config = EngineConfig.from_kwargs(str(base), dtype=args.dtype, enable_lora=True, max_loras=1, max_cpu_loras=1,
                                          max_lora_rank=args.rank)
        cluster = ClusterClient(config, ClusterConfig(replicas=2, router=router))
        finished: set[str] = set()

        def on_update(update):
            finished.update(o.request_id for o in update.outputs if o.finish_reason is not None)

        async def main():
            cluster.start()
            await cluster.attach(on_update, lambda reason: None)
            started = time.perf_counter()
            try:
                params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0)
                for i in range(args.affinity_requests):
                    cluster.add_request(EngineCoreRequest(f"r{i}", [100 + i, 7, 8, 9, 10], params, arrival_time=0.0,
                                                          lora_request=loras[(i // 2) % 2]))
                    await asyncio.sleep(0.02)  # an arrival process, not one burst: reports reach the router
                while len(finished) < args.affinity_requests:
                    await asyncio.sleep(0.01)
                wall = time.perf_counter() - started
                stats = [s for s in cluster.replica_stats.values()]
                return dict(swaps=sum(s.lora_swaps for s in stats), loads=sum(s.lora_loads for s in stats), wall_s=wall)
            finally:
                await cluster.shutdown()

        results[router] = asyncio.run(main())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (the built-in GGUF) or an HF checkpoint directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--adapters", default="1,4,16,64", help="distinct adapters the streams are spread over")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="tokens each stream generates")
    parser.add_argument("--repeats", type=int, default=1, help="runs per config (the best is reported)")
    parser.add_argument("--load-samples", type=int, default=8)
    parser.add_argument("--affinity-requests", type=int, default=24, help="0: skip the two-replica run")
    args = parser.parse_args()
    args.adapters = [int(x) for x in args.adapters.split(",")]
    if args.model == "smollm2":
        from punctual.checkpoints.gguf import gguf_checkpoint, smollm2_file

        base = gguf_checkpoint(smollm2_file())
    else:
        base = Path(args.model)
    print(f"machine: {cpu_line()} | torch threads: {__import__('torch').get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        started = time.perf_counter()
        adapters, merged = build_adapters(base, Path(tmp), max(args.adapters), args.rank)
        print(f"built {len(adapters)} rank-{args.rank} adapters and a merged model in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        rows = offline(args, base, adapters, merged)
        loads = load_times(args, base, adapters)
        routing = affinity(args, base, adapters) if args.affinity_requests else {}
    base_tpot = rows[0][1]["tpot_ms"]
    print(f"\n{args.streams} streams, {args.tokens} tokens each, {args.prompt_len}-token prompts, rank {args.rank}, "
          f"{args.dtype}, model {args.model}")
    print(f"{'config':<34} {'TPOT ms':>8} {'x base':>7} {'tok/s':>8} {'swaps':>6} {'loads':>6}")
    for label, r in rows:
        print(f"{label:<34} {r['tpot_ms']:>8.1f} {r['tpot_ms'] / base_tpot:>7.2f} {r['tok_s']:>8.1f} "
              f"{r['swaps']:>6} {r['loads']:>6}")
    if loads:
        print(f"\nadapter load from disk (read + check, rank {args.rank}): median {statistics.median(loads):.1f} ms, "
              f"max {max(loads):.1f} ms over {len(loads)}")
    print("adapter swap into a slot: no copy on CPU (adapters run from host memory); its cost is the waiting "
          "in the fewer-slots row")
    for router, r in routing.items():
        print(f"two replicas, 1 slot each, {args.affinity_requests} requests over 2 adapters, router {router}: "
              f"{r['swaps']} swaps, {r['loads']} disk reads, {r['wall_s']:.2f} s")


if __name__ == "__main__":
    main()
