"""The portable build of the fused CPU kernels (csrc/cpu_kernels_portable.cpp): which build a CPU
gets, and, on this machine, the AVX2 build (AVX2 + FMA flags only) passing the kernel parity tests
and the engine's greedy parity with eager, as an AVX2-only or Arm CPU would run it.

A process registers torch.ops.punctual once, so the AVX2 build runs its tests in a child process
(PUNCTUAL_KERNELS_ISA=avx2); the build (~20 s on 2 cores) is made once per session and cached.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from punctual.kernels import cpu_kernels
from punctual.kernels.cpu_kernels import KernelsUnavailable, choose_variant

REPO = Path(__file__).resolve().parent.parent
AVX512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}


def test_each_cpu_gets_the_best_build_it_has():
    assert choose_variant(AVX512, "x86_64", "").name == "avx512"
    assert choose_variant({"avx2", "fma", "avx512f"}, "x86_64", "").name == "avx2"  # AVX-512 without BF16
    assert choose_variant({"asimd", "fp"}, "aarch64", "auto").name == "neon"
    assert choose_variant(AVX512, "x86_64", "avx2").name == "avx2"  # forced: CI tests the AVX2 build here


def test_a_build_the_cpu_cannot_run_is_refused_by_name():
    with pytest.raises(KernelsUnavailable, match="avx512_bf16"):
        choose_variant({"avx2", "fma", "avx512f"}, "x86_64", "avx512")
    with pytest.raises(KernelsUnavailable, match="aarch64"):
        choose_variant(AVX512, "x86_64", "neon")
    with pytest.raises(KernelsUnavailable, match="avx2 needs fma"):
        choose_variant({"sse4_2", "avx2"}, "x86_64", "")
    with pytest.raises(ValueError, match="PUNCTUAL_KERNELS_ISA='sse'"):
        choose_variant(AVX512, "x86_64", "sse")


@pytest.fixture(scope="module")
def avx2_build() -> Path:
    """The AVX2 library, built once (cached across sessions in PUNCTUAL_CACHE)."""
    try:
        variant = choose_variant(requested="avx2")
        return cpu_kernels.build(variant=variant)
    except KernelsUnavailable as exc:
        pytest.skip(f"no AVX2 build here: {exc}")


def test_the_avx2_build_has_no_avx512_instruction(avx2_build):
    """It must run on a CPU without AVX-512: no zmm register anywhere in its code."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(avx2_build)], capture_output=True, text=True,
                          check=True).stdout
    assert "ymm" in code  # vectorized at all
    assert "zmm" not in code


def run_child(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PUNCTUAL_KERNELS_ISA="avx2", PUNCTUAL_KERNEL_RULES="avx512")  # the paths the parity tests check
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# The kernel parity tests the AVX2 build runs here (the whole of tests/test_cpu_kernels.py takes
# minutes on a shared machine: `PUNCTUAL_KERNELS_ISA=avx2 python -m pytest tests/test_cpu_kernels.py`
# runs all of it): every kernel against eager or its exact math, decode_stack against the
# layer-by-layer path (bf16, and int8 weights with an int8 KV cache, and Quest's sparse decodes,
# whose block selection is also checked against PyTorch's), and greedy tokens against eager.
PARITY_TESTS = [
    "tests/test_cpu_kernels.py::" + name for name in (
        "test_the_build_loaded_is_the_one_requested", "test_rms_norm_is_eagers_bit_for_bit",
        "test_rope_and_silu_mul_are_eagers_bit_for_bit", "test_linear_rounds_once_and_does_not_depend_on_its_batch",
        "test_kernels_name_bad_input", "test_argmax_rows_is_torchs_argmax",
        "test_int8_linear_is_the_dequantized_product_rounded_once",
        "test_int4_linear_is_the_dequantized_product_rounded_once", "test_int4_q8_linear_is_its_int8_activation_math",
        "test_int4_q8_linear_names_bad_input", "test_engine_runs_fused_unless_eager_is_enforced",
        "test_decode_stack_is_the_layer_by_layer_path_bit_for_bit[builtin-tiny-none-True-auto]",
        "test_decode_stack_is_the_layer_by_layer_path_bit_for_bit[llama_head64-int8-True-int8]",
        "test_decode_stack_does_not_depend_on_its_threads")
] + ["tests/test_attention.py::test_fused_kernel_attention_matches_dense",
     "tests/test_attention.py::test_fused_kernel_names_an_int8_cache_it_cannot_read",
     "tests/test_lora.py::test_the_sgmv_kernel_adds_what_the_pytorch_ops_add",
     "tests/test_sparse_attention.py::test_kernel_selection_is_the_references",
     "tests/test_sparse_attention.py::test_whole_stack_kernel_selects_as_the_pytorch_reference",
     # csrc/gemm_prep.h's plain loops (the AVX-512 build takes intrinsics): the PyTorch steps bit for bit.
     "tests/test_kernel_table.py::test_int8_gemm_op_is_the_pytorch_steps_bit_for_bit",
     "tests/test_kernel_table.py::test_dequantize_int4_op_is_dequantize_bit_for_bit"]


def test_the_avx2_build_passes_the_kernel_parity_tests(avx2_build):
    """The AVX2 build as an AVX2-only CPU runs it: eager's element-wise results bit for bit, GEMMs
    rounded once and batch-invariant, decode_stack equal to the layer-by-layer path, attention
    against dense, and the engine's greedy tokens equal to eager's on a tiny model."""
    result = run_child(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *PARITY_TESTS])
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, result.stdout[-2000:]


LINEARS = """
import sys, torch
from punctual.kernels import cpu_kernels
from punctual.kernels.quant import quantize_int8, quantize_int4
ops = cpu_kernels.load()
g = torch.Generator().manual_seed(5)
w = (torch.randn(96, 256, generator=g) * 0.05).to(torch.bfloat16)
x = torch.randn(7, 256, generator=g).to(torch.bfloat16)
bias = torch.randn(96, generator=g).to(torch.bfloat16)
q8, q4, q4_bf16 = quantize_int8(w), quantize_int4(w), quantize_int4(w)
q4.attach_fused(ops)
q4_bf16.attach_fused(ops, int8_activations=False)
out = {"variant": cpu_kernels.loaded_variant(),
       "bf16": ops.linear_bf16(x, ops.pack_bf16(w), bias),
       "int8": ops.linear_int8(x, ops.pack_int8(q8.data), q8.scales.float(), bias),
       "int4_q8": ops.linear_int4_q8(x, q4.fused, q4.fused_scales, q4.fused_zeros, 32, bias),
       "int4": q4_bf16.linear(x, bias)}  # linear_int4 (bf16 activations): 7 rows
torch.save(out, sys.argv[1])
"""


def test_the_avx2_linears_are_the_avx512_builds_bit_for_bit(avx2_build, tmp_path):
    """The portable GEMMs sum in vdpbf16ps's order (and the int8-activation kernel in exact
    integers): every linear of a model is the same on an AVX2 CPU as on an AVX-512 one."""
    if cpu_kernels.loaded_variant() != "avx512":
        pytest.skip("needs the AVX-512 build in this process to compare with")
    result = run_child(["-c", LINEARS, str(tmp_path / "avx2.pt")], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    avx2 = torch.load(tmp_path / "avx2.pt")
    assert avx2.pop("variant") == "avx2"
    mine = {}
    exec(LINEARS.replace("torch.save(out, sys.argv[1])", ""), mine)
    for kind, value in avx2.items():
        assert torch.equal(value, mine["out"][kind]), kind
