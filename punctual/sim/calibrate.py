"""`punctual sim calibrate`: time the real engine's steps on this machine and fit a profile.

The engine core is driven step by step over a grid of shapes (single prompts of growing length,
short suffixes after a cached prefix, decode batches of growing size at short and long contexts,
and the mixed steps between), each step timed whole (schedule, execute, update: what a server's
step loop takes), and the step times are fitted by least squares to the profile's features.
Imports torch (it runs the model); the simulator's run path does not import this module.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable

from punctual.sim.profile import FEATURES, StepProfile, fit_robust, plan_features


def machine_description() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def calibrate(model: str, engine_kwargs: dict, max_prompt: int = 512, max_batch: int = 32, repeats: int = 1,
              log: Callable[[str], None] = print, seed: int = 0) -> StepProfile:
    import numpy as np

    from punctual.config import EngineConfig
    from punctual.engine.core import EngineCore
    from punctual.request import EngineCoreRequest
    from punctual.sampling_params import SamplingParams

    kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    # Prefix caching stays as the engine would serve: the grid's random prompts share no block, so
    # every token of theirs is computed, and its prefix-hit steps need the cache.
    config = EngineConfig.from_kwargs(model, **kwargs)
    core = EngineCore(config)
    runner = core.runner
    rng = np.random.default_rng(seed)
    vocab = runner.arch.vocab_size
    budget = config.scheduler.max_num_batched_tokens
    max_prompt = min(max_prompt, core.max_model_len - 8, core.kv_manager.num_blocks * config.cache.block_size // 2)
    max_batch = min(max_batch, config.scheduler.max_num_seqs)
    rows: list[tuple[float, ...]] = []
    seconds: list[float] = []
    counter = iter(range(1 << 30))

    def run(shapes: list[tuple[int | list[int], int]], measured: bool = True) -> None:
        """Requests of (prompt tokens or their number, output tokens), all at once, stepped to completion."""
        for prompt, output_len in shapes:
            tokens = rng.integers(1, vocab, size=prompt).tolist() if isinstance(prompt, int) else prompt
            core.add_request(EngineCoreRequest(f"cal-{next(counter)}", tokens,
                                               SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)))
        while core.has_unfinished_requests():
            captured = []
            execute = runner.execute

            def capture(plan, _execute=execute):
                captured.append(plan)
                return _execute(plan)
            runner.execute = capture
            started = time.perf_counter()
            core.step()
            elapsed = time.perf_counter() - started
            runner.execute = execute
            if measured and captured and captured[0].scheduled:
                rows.append(plan_features(captured[0]))
                seconds.append(elapsed)

    started = time.perf_counter()
    run([(32, 4), (64, 4)], measured=False)  # warm-up: first-call allocations stay out of the fit
    prompts = sorted({p for p in (16, 64, 128, 256, 384, 512, 768, 1024, 1536) if p <= max_prompt} | {max_prompt})
    # Every power of two up to the largest batch: a CPU's linears switch kernels by rows (on an AMX
    # Xeon the small-batch kernel up to 4 rows, oneDNN's 16-row tiles above), so a step's cost is
    # not one line through 1, 8 and 32 rows; and decodes over the longest prompt too, whose KV
    # reads a busy server's long contexts pay.
    batches = sorted({b for b in (1, 2, 4, 8, 16) if b <= max_batch} | {max_batch})
    contexts = sorted({c for c in (32, 256) if c <= max_prompt} | {max_prompt})
    block_size = config.cache.block_size  # a prefix of whole blocks is what the cache can hit
    prefixes = sorted({p // block_size * block_size for p in (256, 1024) if block_size <= p <= max_prompt - 64})
    for _ in range(repeats):
        for prompt_len in prompts:  # prefill-dominated steps, one prompt at a time
            run([(prompt_len, 2)])
        if config.cache.enable_prefix_caching:  # a short suffix after a cached prefix (a shared document)
            for prefix_len in prefixes:
                prefix = rng.integers(1, vocab, size=prefix_len).tolist()
                run([(prefix, 1)], measured=False)
                for suffix_len in (8, 24, 64):
                    run([(prefix + rng.integers(1, vocab, size=suffix_len).tolist(), 2)])
        for context in contexts:  # decode batches over short and long contexts (and their mixed prefills)
            for batch in batches:
                if batch * (context + 8) > core.kv_manager.num_blocks * config.cache.block_size:
                    continue
                run([(context, 6)] * batch)
        run([(max_prompt, 2), *[(32, 24)] * min(8, max_batch)])  # a prompt chunked beside running decodes
    log(f"calibration: {len(rows)} steps in {time.perf_counter() - started:.1f} s (budget {budget} tokens)")
    kv_transfer = time_kv_transfer(core, rng, log)
    coefficients, kept = fit_robust(rows, seconds)
    profile = StepProfile("linear", coefficients)
    errors = sorted(abs(profile.predict(rows[i]) - seconds[i]) / seconds[i] for i in kept)
    return StepProfile(
        "linear", coefficients, dtype=str(runner.dtype).replace("torch.", ""),
        model={"name": model, "architecture": runner.arch.architecture, "hidden_size": runner.arch.hidden_size,
               "num_layers": runner.arch.num_layers, "vocab_size": vocab, "max_model_len": core.max_model_len,
               "kv_bytes_per_token": runner.kv_bytes_per_block // block_size},
        machine={**machine_description(), "device": str(runner.device)},
        num_kv_blocks=core.kv_manager.num_blocks, kv_transfer=kv_transfer,
        fit={"num_steps": len(rows), "num_outliers": len(rows) - len(kept), "features": list(FEATURES),
             "num_prefix_hit_steps": sum(1 for r in rows if r[1] and r[3] > r[1]),  # prompt work after a cached start
             "median_abs_rel_error": errors[len(errors) // 2], "p90_abs_rel_error": errors[int(len(errors) * 0.9)],
             "mean_step_s": sum(seconds) / len(seconds)},
        engine={"block_size": block_size, "max_num_batched_tokens": budget,
                "max_num_seqs": config.scheduler.max_num_seqs, **{k: v for k, v in kwargs.items()
                                                                 if isinstance(v, (int, float, str, bool))}})


def time_kv_transfer(core, rng, log: Callable[[str], None] = print, repeats: int = 3) -> dict | None:
    """Time the real KV transfer path in-process and fit seconds = fixed_s + bytes / bytes_per_s.

    One running request's first n blocks are read with `EngineCore.export_kv` (what the
    source's core does for `kv_export` / `kv_migrate_out`), encoded and decoded as the relay
    transport's raw buffer (the socket or Ray object between them) and written with `write_blocks` into spare blocks (what the
    target's step does with a received payload). No network and no RPC round trips are in it:
    between machines, add the link (a `--hardware` profile's interconnect) and the round trips."""
    import numpy as np

    from punctual.runner.kv_transfer import from_inline, to_inline, write_blocks
    from punctual.request import EngineCoreRequest
    from punctual.sampling_params import SamplingParams

    kv = core.kv_manager
    block_size = kv.block_size
    max_blocks = min(64, kv.num_free_blocks // 3, (core.max_model_len - 8) // block_size)
    if max_blocks < 2:
        log("calibration: too few KV blocks to time a transfer; the profile has no kv_transfer")
        return None
    request_id = "cal-kv-transfer"
    prompt = rng.integers(1, core.runner.arch.vocab_size, size=max_blocks * block_size + 1).tolist()
    core.add_request(EngineCoreRequest(request_id, prompt, SamplingParams(max_tokens=64, ignore_eos=True,
                                                                          temperature=0)))
    while core.scheduler.requests[request_id].num_output_tokens == 0:
        core.step()
    spare = kv.pool.allocate(max_blocks)
    sizes, seconds = [], []
    counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max_blocks} | {max_blocks})
    try:
        for _ in range(repeats):
            for n in counts:
                started = time.perf_counter()
                payload = from_inline(to_inline(core.export_kv(request_id, 0, n)))
                write_blocks(core.runner.kv_caches, spare[:n], payload)
                seconds.append(time.perf_counter() - started)
                sizes.append(payload.nbytes)
    finally:
        kv.pool.release(spare)
        core.abort_requests([request_id])
        while core.has_unfinished_requests():
            core.step()
    fastest: dict[int, float] = {}  # per size, the fastest copy: interference only ever slows one
    for size, elapsed in zip(sizes, seconds):
        fastest[size] = min(elapsed, fastest.get(size, elapsed))
    x = np.stack([np.ones(len(fastest)), np.asarray(list(fastest), dtype=float)], axis=1)
    (fixed, per_byte), *_ = np.linalg.lstsq(x, np.asarray(list(fastest.values())), rcond=None)
    if per_byte <= 0 or fixed < 0:  # too small to see the bandwidth: all of it fixed, the largest at that
        fixed = min(fastest.values())
        per_byte = max(fastest.values()) / max(fastest)
    result = {"fixed_s": max(0.0, float(fixed)), "bytes_per_s": 1.0 / float(per_byte),
              "source": "measured in-process: export_kv, relay encoding, write_blocks (no network, no RPC round trips)",
              "num_copies": len(sizes), "max_bytes": max(sizes)}
    log(f"calibration: KV transfer {result['fixed_s'] * 1000:.2f} ms + {result['bytes_per_s'] / 1e9:.2f} GB/s "
        f"over {len(sizes)} copies of 1-{max_blocks} blocks")
    return result
