"""The kernel table: a CPU's rule read from the committed file or derived from its features, the
linears taking the path it names, and int8 big batches through int8 activations (int8_gemm)."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from punctual import LLM, SamplingParams
from punctual.kernels import cpu_kernels, quant, tune_table
from punctual.kernels.quant import INT4_Q8_FUSED_MAX_ROWS, INT8_FUSED_MAX_ROWS, QuantizedWeight, quantize_int8
from punctual.kernels.tune_table import (AVX512_RULES, CpuInfo, KernelTable, default_rules, load_table,
                                         read_cpu_info)
from punctual.models.linear import FUSED_LINEAR_MAX_ROWS, FusedWeight

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
"""
SAPPHIRE = CpuInfo("Intel(R) Xeon(R) Platinum 8480+",
                   frozenset({"avx2", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}))

ops = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(ops is None, reason="fused CPU kernels unavailable here")
needs_int8_gemm = pytest.mark.skipif(not hasattr(torch.ops.onednn, "qlinear_prepack"),
                                     reason="this torch has no oneDNN int8 linear")
# int8: the fused kernel up to 4 rows, the int8 x int8 GEMM above.
INT8_GEMM_RULE = KernelTable(bf16=((4, "fused"), (None, "onednn")), int8=((4, "fused"), (None, "int8_gemm")),
                             int4=((4, "fused"), (None, "dequantize")), source="test")


def test_cpu_info_reads_the_model_and_the_listed_features():
    cpu = read_cpu_info(CPUINFO)
    assert cpu == SAPPHIRE  # amx_tile and avx512f are not among FEATURES
    assert cpu.key == "Intel(R) Xeon(R) Platinum 8480+ | amx_bf16 amx_int8 avx2 avx512_bf16 avx512_vnni"
    assert read_cpu_info("") == CpuInfo("unknown", frozenset())


def test_default_rules_follow_the_features():
    # Without AMX: the rule measured on the AVX-512 BF16 machine, the constants the code kept.
    plain = default_rules(frozenset({"avx512_bf16", "avx512_vnni"}))
    assert plain.fused_max_rows("bf16") == FUSED_LINEAR_MAX_ROWS
    assert plain.fused_max_rows("int8") == INT8_FUSED_MAX_ROWS
    assert plain.fused_max_rows("int4") == INT4_Q8_FUSED_MAX_ROWS
    assert (plain.bf16, plain.int8, plain.int4) == (AVX512_RULES["bf16"], AVX512_RULES["int8"], AVX512_RULES["int4"])
    # With AMX: oneDNN's tiles from a few rows, int8 batches through the int8 GEMM.
    amx = default_rules(SAPPHIRE.features)
    assert amx.path("bf16", 1) == "fused" and amx.path("bf16", 16) == "onednn"
    assert amx.path("int8", 1) == "fused" and amx.path("int8", 32) == "int8_gemm"
    assert amx.path("int4", 1) == "fused" and amx.path("int4", 513) == "dequantize"
    assert "amx_int8" in amx.source


def test_a_listed_cpu_takes_its_measured_rule(tmp_path):
    path = tmp_path / "table.json"
    entry = {"bf16": [[2, "fused"], [None, "onednn"]], "int8": [[2, "fused"], [64, "int8pack"], [None, "int8_gemm"]],
             "int4": [[32, "fused"], [None, "dequantize"]], "measured": "tune_kernels.py, 1 thread"}
    path.write_text(json.dumps({"cpus": {SAPPHIRE.key: entry}}))
    table = load_table(SAPPHIRE, path)
    assert [table.path("int8", rows) for rows in (1, 2, 3, 64, 65)] == ["fused"] * 2 + ["int8pack"] * 2 + ["int8_gemm"]
    assert table.fused_max_rows("bf16") == 2 and "1 thread" in table.source
    # The same model with other features (another VM type) is another CPU: its default.
    other = CpuInfo(SAPPHIRE.model, frozenset({"avx2"}))
    assert load_table(other, path) == default_rules(other.features)
    # The committed file parses, whatever CPUs it lists.
    for key in json.loads(tune_table.TABLE_PATH.read_text())["cpus"]:
        model, _, features = key.partition(" | ")
        load_table(CpuInfo(model, frozenset(features.split())))


@pytest.mark.parametrize("kind,rule,match", [
    ("int8", [[8, "fused"]], "open range"),
    ("int8", [[8, "int8pack"], [None, "fused"]], "first range only"),
    ("int8", [[8, "fused"], [4, "int8pack"], [None, "dequantize"]], "increasing"),
    ("int4", [[8, "fused"], [None, "int8_gemm"]], "unknown int4 path 'int8_gemm'"),
    ("fp8", [[None, "fused"]], "unknown weight kind"),
])
def test_a_bad_rule_is_refused_by_name(kind, rule, match, tmp_path):
    entry = {"bf16": [[None, "onednn"]], "int8": [[None, "dequantize"]], "int4": [[None, "dequantize"]], kind: rule}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"cpus": {SAPPHIRE.key: entry}}))
    with pytest.raises(ValueError, match=match):
        load_table(SAPPHIRE, path)


@needs_kernels
def test_linears_take_the_path_the_table_names():
    weight = torch.randn(64, 128).bfloat16()
    fused = FusedWeight.from_weight(weight, ops, batch_invariant=False, table=INT8_GEMM_RULE)
    assert fused.max_rows == 4
    q = quantize_int8(weight)
    q.attach_fused(ops, table=INT8_GEMM_RULE)
    assert [q.path(rows) for rows in (1, 4, 5, 300)] == ["fused", "fused", "int8_gemm", "int8_gemm"]
    assert q.max_fused_rows == 4
    x = torch.randn(5, 128).bfloat16()
    assert torch.equal(q.linear(x), q.linear_int8_gemm(x))
    # Without int8 activations the rule's int8_gemm dequantizes instead (and nothing is prepacked).
    plain = quantize_int8(weight)
    plain.attach_fused(ops, int8_activations=False, table=INT8_GEMM_RULE)
    assert plain.gemm is None and plain.path(5) == "dequantize"


def int8_gemm_reference(x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Rows quantized as linear_int4_q8 quantizes its groups (d = max|x| / 127, round half to even
    of x * (1 / d), in fp32), the integer products exact in float64, then the scales and bias."""
    x32 = x.float()
    d = x32.abs().amax(dim=1, keepdim=True) / 127
    xq = torch.round(x32 * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    out = (xq.double() @ q.data.double().t()) * q.scales.double() * d.double()
    return out if bias is None else out + bias.double()


@needs_kernels
@needs_int8_gemm
def test_int8_gemm_is_the_int8_activation_math():
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(96, 256, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    x = torch.randn(40, 256, generator=gen).bfloat16()
    x[7] = 0  # an all-zero row: scale 0, output the bias, no NaN
    q = quantize_int8(weight)
    q.attach_fused(ops, table=INT8_GEMM_RULE)
    out = q.linear(x, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (40, 96)
    assert torch.equal(out[7], bias)
    # Tightly the row-quantized math: the int32 sums are exact, one bf16 rounding at the end.
    reference = int8_gemm_reference(x, q, bias)
    assert ((out.double() - reference).abs() <= reference.abs() * 2 ** -8 + 1e-4).all()
    # Loosely the bf16-activation product the fused kernel computes: int8 rows cost ~0.5%.
    exact = F.linear(x.double(), q.dequantize(torch.float64), bias.double())
    assert (out.double() - exact).norm() / exact.norm() < 0.01
    fused = ops.linear_int8(x, q.fused, q.fused_scales, bias)
    assert (out.double() - fused.double()).norm() / fused.double().norm() < 0.01
    # A row's result ignores the rows beside it (exact integer sums): batch invariant above the kernel.
    assert torch.equal(q.linear(x[10:30], bias), out[10:30])


@needs_kernels
@needs_int8_gemm
@pytest.mark.parametrize("rows,k", [(1, 256), (40, 256), (33, 200), (300, 72)])  # k % 32, k % 16: vector tails
def test_int8_gemm_op_is_the_pytorch_steps_bit_for_bit(rows, k):
    """linear_int8_gemm (C++: quantize rows, oneDNN's GEMM, scale and bias in one pass) gives what the
    PyTorch ops of int8_gemm_torch give, bit for bit, with and without a bias."""
    gen = torch.Generator().manual_seed(rows + k)
    q = quantize_int8((torch.randn(96, k, generator=gen) * 0.05).bfloat16())
    q.attach_fused(ops, table=INT8_GEMM_RULE)
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 8).bfloat16()
    x[rows // 2] = 0  # an all-zero row: scale 0, the output is the bias
    bias = torch.randn(96, generator=gen).bfloat16()
    for b in (bias, None):
        out = ops.linear_int8_gemm(x, q.gemm, q.fused_scales, q.gemm_zero_points, b)
        assert torch.equal(out, quant.int8_gemm_torch(x, q.gemm, q.fused_scales, q.gemm_zero_points, b))
    # The model's int8_gemm path takes the op.
    assert torch.equal(q.run("int8_gemm", x, bias), quant.int8_gemm_torch(x, q.gemm, q.fused_scales, q.gemm_zero_points, bias))
    with pytest.raises(RuntimeError, match="bias has 95 values, expected 96"):
        ops.linear_int8_gemm(x, q.gemm, q.fused_scales, q.gemm_zero_points, bias[:95])


@needs_kernels
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])  # float32: a GGUF file's exact scales
def test_dequantize_int4_op_is_dequantize_bit_for_bit(scale_dtype):
    """The C++ dequantize_int4 gives QuantizedWeight.dequantize(bfloat16), its roundings included,
    and the dequantize path's linear is F.linear over it."""
    gen = torch.Generator().manual_seed(11)
    q = quant.quantize_int4((torch.randn(48, 96, generator=gen) * 0.05).bfloat16())
    q.scales = q.scales.to(scale_dtype) * (1 + torch.rand(q.scales.shape, generator=gen) / 100).to(scale_dtype)
    dense = ops.dequantize_int4(q.nibbles, q.scales, q.group_size)
    assert torch.equal(dense, q.dequantize(torch.bfloat16))
    x = torch.randn(9, 96, generator=gen).bfloat16()
    assert torch.equal(q.run("dequantize", x), F.linear(x, q.dequantize(torch.bfloat16)))
    with pytest.raises(RuntimeError, match="groups of 40 do not divide 96"):
        ops.dequantize_int4(q.nibbles, q.scales, 40)


@needs_kernels
@needs_int8_gemm
def test_int8_model_answers_through_the_int8_gemm(monkeypatch):
    monkeypatch.setattr(quant, "kernel_table", lambda: INT8_GEMM_RULE)
    calls = []
    gemm = QuantizedWeight.linear_int8_gemm
    monkeypatch.setattr(QuantizedWeight, "linear_int8_gemm", lambda self, x, bias=None: calls.append(x.shape[0])
                        or gemm(self, x, bias))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(20, 60))] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    reference = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=64)
    quantized = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=64, quantization="int8")
    firsts = [[lp.top[0][0] for o in llm.generate(inputs, params, use_tqdm=False) for lp in o.prompt_logprobs[1:]]
              for llm in (reference, quantized)]
    assert calls and max(calls) > 4  # the prompts' rows went through the int8 GEMM
    assert sum(a == b for a, b in zip(*firsts)) / len(firsts[0]) >= 0.9
    out = quantized.generate(inputs[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_a_forced_portable_build_takes_the_table_of_the_cpu_without_avx512_and_amx(monkeypatch):
    """PUNCTUAL_KERNELS_ISA=avx2 on an AMX machine: the rule (and the table's key) is that of the
    same CPU without the features the portable build cannot use, as on an AVX2-only machine."""
    amx = tune_table.CpuInfo("Xeon", frozenset({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx2"}))
    monkeypatch.setattr(tune_table, "read_cpu_info", lambda: amx)
    for isa, expected in (("avx2", frozenset({"avx2"})), ("", amx.features), ("avx512", amx.features)):
        monkeypatch.setenv("PUNCTUAL_KERNELS_ISA", isa)
        tune_table.cpu_info.cache_clear()
        assert tune_table.cpu_info().features == expected
    tune_table.cpu_info.cache_clear()
    monkeypatch.delenv("PUNCTUAL_KERNELS_ISA")
    assert tune_table.default_rules(frozenset({"avx2"})).describe() != tune_table.default_rules(amx.features).describe()


def test_a_cpu_without_avx512_bf16_defaults_to_the_portable_rule():
    """An AVX2-only CPU not in the table: the portable kernel for bf16 at every row count (oneDNN's
    bf16 GEMM without AVX-512 was 3.5x slower on prompts), torch's int8pack / int4pack kernels."""
    avx2 = tune_table.default_rules(frozenset({"avx2"}))
    assert avx2.path("bf16", 1) == avx2.path("bf16", 4096) == "fused"
    assert avx2.path("int8", 1) == "int8pack" and avx2.path("int8", 512) == "int8_gemm"
    assert avx2.path("int4", 512) == "int4pack"


def test_a_named_rule_can_be_pinned_and_a_bad_name_is_refused(monkeypatch):
    monkeypatch.setenv("PUNCTUAL_KERNEL_RULES", "portable")
    tune_table.kernel_table.cache_clear()
    try:
        assert tune_table.kernel_table().path("bf16", 512) == "fused"
        monkeypatch.setenv("PUNCTUAL_KERNEL_RULES", "fastest")
        tune_table.kernel_table.cache_clear()
        with pytest.raises(ValueError, match="PUNCTUAL_KERNEL_RULES must be one of avx512, amx, portable"):
            tune_table.kernel_table()
    finally:
        monkeypatch.delenv("PUNCTUAL_KERNEL_RULES")
        tune_table.kernel_table.cache_clear()
