"""A speed probe of a running server: how fast this machine decodes right now.

On a shared machine the same step takes another time ten minutes later (a quiet smollm2 round:
the calibration's traced steps averaged 10.4 ms, the validation's TPOT p50 at 0.5 req/s was
12.5 ms). A profile holds the machine's speed at calibration; the probe measures the speed at
any later moment, so `sim validate --rescale-per-point` can price each point's steps at the
speed the machine had when that point was measured.

The probe is one fixed request (PROMPT_TOKENS synthetic words, OUTPUT_TOKENS tokens with
ignore_eos, greedy) sent REPEATS times one after another to the idle server; its figure is the
median over the requests of end-to-end seconds per output token (one prefill and OUTPUT_TOKENS
- 1 single-stream decode steps, the front end's delays once). Not the TPOT: that starts at the
first chunk with text, which on a random-weight model can come many tokens late. It uses the
server already running, so no second model is loaded, and costs about REPEATS x OUTPUT_TOKENS
single-stream steps (~2 s at 10 ms a step). `calibrate --server` runs it between its load
phases and keeps their mean in the profile; the ratio of a later probe to that mean is the
factor on the step costs.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from punctual.bench.workloads import BenchRequest, words

PROMPT_TOKENS = 64
OUTPUT_TOKENS = 64
REPEATS = 3
PROBE_SEED = 16  # the prompt's words: any fixed draw, the same at calibration and validation


def probe_request() -> BenchRequest:
    return BenchRequest(words(np.random.default_rng(PROBE_SEED), PROMPT_TOKENS), PROMPT_TOKENS, OUTPUT_TOKENS)


def probe_spec() -> dict:
    """What a probe figure was measured with: two figures compare only if these are equal."""
    return {"prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "repeats": REPEATS}


def run_probe(endpoint, repeats: int = REPEATS, transport=None) -> dict:
    """Probe the server at `endpoint` (idle: nothing else in flight). Returns {"token_s": the
    median seconds per output token, "token_samples_s": each request's, "seconds": the probe's
    wall time}."""
    from punctual.bench import loadgen

    started = time.perf_counter()
    result = loadgen.run(endpoint, [probe_request()] * repeats, concurrency=1, progress=False, transport=transport)
    failed = [r.error or f"{r.output_tokens} tokens" for r in result.records
              if not r.ok or r.output_tokens != OUTPUT_TOKENS]
    if failed:
        raise RuntimeError(f"speed probe: a probe request failed ({failed[0]}; {OUTPUT_TOKENS} tokens asked)")
    samples = [r.e2e_s / r.output_tokens for r in result.records]
    return {"token_s": statistics.median(samples), "token_samples_s": samples,
            "seconds": time.perf_counter() - started}


def calibration_probe(rounds: list[dict]) -> dict:
    """The profile's record of the probes run during calibration: their mean is the reference
    (the serving fit averages over the whole calibration, so the reference does too)."""
    return {**probe_spec(), "token_s": statistics.fmean(r["token_s"] for r in rounds),
            "rounds_token_s": [r["token_s"] for r in rounds]}


def check_reference(reference: dict | None) -> dict:
    """The profile's probe record, if a probe now compares with it; else a ValueError that says why."""
    if reference is None:
        raise ValueError("this profile has no speed probe, so validate cannot rescale it per point: "
                         "calibrate it again with `punctual sim calibrate --server`, which records one")
    if any(reference.get(k) != v for k, v in probe_spec().items()):
        raise ValueError(f"the profile's speed probe ({reference}) is not this version's ({probe_spec()}): "
                         "calibrate it again with `punctual sim calibrate --server`")
    return reference


def speed_scale(reference: dict | None, token_s: float) -> float:
    """The factor on step costs for a probe of `token_s` seconds per token, against the profile's."""
    return token_s / check_reference(reference)["token_s"]
