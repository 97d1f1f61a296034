"""`punctual sim calibrate`: time the real engine's steps on this machine and fit a profile.

The engine core is driven step by step over a grid of shapes (single prompts of growing length,
decode batches of growing size at short and long contexts, and the mixed steps between), each
step timed whole (schedule, execute, update: what a server's step loop takes), and the step
times are fitted by least squares to the profile's features. Imports torch (it runs the model);
the simulator's run path does not import this module.
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
    kwargs["enable_prefix_caching"] = False  # every prompt token computed: the work the fit must see
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

    def run(shapes: list[tuple[int, int]], measured: bool = True) -> None:
        """Requests of (prompt tokens, output tokens), all at once, stepped to completion."""
        for prompt_len, output_len in shapes:
            tokens = rng.integers(1, vocab, size=prompt_len).tolist()
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
    batches = sorted({b for b in (1, 8) if b <= max_batch} | {max_batch})
    contexts = sorted({c for c in (32, 256) if c <= max_prompt})
    for _ in range(repeats):
        for prompt_len in prompts:  # prefill-dominated steps, one prompt at a time
            run([(prompt_len, 2)])
        for context in contexts:  # decode batches over short and long contexts (and their mixed prefills)
            for batch in batches:
                if batch * (context + 8) > core.kv_manager.num_blocks * config.cache.block_size:
                    continue
                run([(context, 6)] * batch)
        run([(max_prompt, 2), *[(32, 24)] * min(8, max_batch)])  # a prompt chunked beside running decodes
    log(f"calibration: {len(rows)} steps in {time.perf_counter() - started:.1f} s (budget {budget} tokens)")
    coefficients, kept = fit_robust(rows, seconds)
    profile = StepProfile("linear", coefficients)
    errors = sorted(abs(profile.predict(rows[i]) - seconds[i]) / seconds[i] for i in kept)
    block_size = config.cache.block_size
    return StepProfile(
        "linear", coefficients, dtype=str(runner.dtype).replace("torch.", ""),
        model={"name": model, "architecture": runner.arch.architecture, "hidden_size": runner.arch.hidden_size,
               "num_layers": runner.arch.num_layers, "vocab_size": vocab, "max_model_len": core.max_model_len,
               "kv_bytes_per_token": runner.kv_bytes_per_block // block_size},
        machine={**machine_description(), "device": str(runner.device)},
        num_kv_blocks=core.kv_manager.num_blocks,
        fit={"num_steps": len(rows), "num_outliers": len(rows) - len(kept), "features": list(FEATURES),
             "median_abs_rel_error": errors[len(errors) // 2], "p90_abs_rel_error": errors[int(len(errors) * 0.9)],
             "mean_step_s": sum(seconds) / len(seconds)},
        engine={"block_size": block_size, "max_num_batched_tokens": budget,
                "max_num_seqs": config.scheduler.max_num_seqs, **{k: v for k, v in kwargs.items()
                                                                 if isinstance(v, (int, float, str, bool))}})
