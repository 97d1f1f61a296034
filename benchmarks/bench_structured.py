"""Structured output on `builtin` (random weights, SmolLM-135M shape, 49k vocabulary), in-process:

1. TPOT with and without a constraint at several batch sizes: N requests are prefilled, then
   --steps decode steps are timed while all N run (same prompts, same lengths); plain and
   constrained runs alternate, --repeats times, and the median of each is reported.
2. Validity: every schema of bench_grammar.py, --samples sampled answers each (temperature 1):
   the share that finish (EOS) and, of those, the share that parse and validate (jsonschema).

    python benchmarks/bench_structured.py [--batches 1 8 32] [--steps 24] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema

from punctual.config import EngineConfig
from punctual.engine.core import EngineCore
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from punctual.structured.spec import StructuredOutput
from punctual.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_grammar import SCHEMAS  # noqa: E402

# Long answers: a JSON array of short lowercase strings, so no request ends inside the timed steps.
LONG = StructuredOutput.json_schema({"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                     "minItems": 200})


def tpot_ms(core: EngineCore, batch: int, steps: int, structured: StructuredOutput | None, tag: str) -> float:
    for i in range(batch):
        core.add_request(EngineCoreRequest(f"{tag}-{i}", [1 + i, 2, 3, 4, 5, 6, 7, 8],
                                           SamplingParams(max_tokens=steps + 40, temperature=1.0,
                                                          structured=structured)))
    produced: dict[str, int] = {}
    while len([r for r, n in produced.items() if n > 0]) < batch:  # until every request has its first token
        for out in core.step():
            produced[out.request_id] = produced.get(out.request_id, 0) + len(out.new_token_ids)
    started = time.perf_counter()
    for _ in range(steps):
        for out in core.step():
            assert not out.finished, f"{out.request_id} finished inside the timed steps"
    elapsed = time.perf_counter() - started
    core.abort_requests([f"{tag}-{i}" for i in range(batch)])
    return elapsed / steps * 1000


def validity(core: EngineCore, samples: int) -> dict:
    tokenizer = load_tokenizer(core.runner.model_path)
    results = {}
    for name, schema in SCHEMAS.items():
        spec = StructuredOutput.json_schema(schema)
        texts: dict[str, list[int]] = {}
        reasons: dict[str, str] = {}
        for i in range(samples):
            core.add_request(EngineCoreRequest(f"{name}-{i}", [10 + i, 20, 30], SamplingParams(
                max_tokens=256, temperature=1.0, seed=i, structured=spec)))
            texts[f"{name}-{i}"] = []
        while core.has_unfinished_requests():
            for out in core.step():
                texts[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        finished = [rid for rid, why in reasons.items() if why == "stop"]
        valid = 0
        for rid in finished:
            try:
                jsonschema.validate(json.loads(tokenizer.decode(texts[rid], skip_special_tokens=True)), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        results[name] = (len(finished), valid, samples)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--model", default="builtin", help="builtin (random weights) or smollm2 (a trained model)")
    args = parser.parse_args()
    core = EngineCore(EngineConfig.from_kwargs(args.model, kv_cache_memory="1GiB"))
    tpot_ms(core, 1, 4, LONG, "warm")  # compile LONG, warm the kernels
    for batch in args.batches:  # --batches with no value: validity only
        plain, guided = [], []
        for r in range(args.repeats):
            plain.append(tpot_ms(core, batch, args.steps, None, f"p{batch}-{r}"))
            guided.append(tpot_ms(core, batch, args.steps, LONG, f"g{batch}-{r}"))
        p, g = statistics.median(plain), statistics.median(guided)
        print(f"batch {batch:3d}: TPOT plain {p:7.2f} ms, json schema {g:7.2f} ms, ratio {g / p:.3f} "
              f"(plain runs {[round(x, 1) for x in plain]}, guided {[round(x, 1) for x in guided]})")
    results = validity(core, args.samples)
    for name, (finished, valid, total) in results.items():
        print(f"{name:15s} finished {finished}/{total}, of which parse and validate {valid}/{finished}")
    finished = sum(f for f, _, _ in results.values())
    print(f"all: finished {finished}/{sum(t for _, _, t in results.values())}, "
          f"valid {sum(v for _, v, _ in results.values())}/{finished}")


if __name__ == "__main__":
    main()
