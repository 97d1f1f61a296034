"""int8 KV cache: more tokens in the same memory, greedy tokens close to the unquantized cache."""
from __future__ import annotations

import random

import pytest
import torch

from hf_models import VOCAB
from punctual import LLM, SamplingParams
from punctual.models.attention import quantize_int8

# The tests' random models have small logit gaps, so this is a harsh setting; see BENCHMARKS.md.
MIN_AGREEING_PREFIX = 0.8


def test_quantize_roundtrip_error_is_within_half_a_step():
    x = torch.randn(7, 3, 64)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (7, 3)
    error = (q.float() * scale.unsqueeze(-1) - x).abs()
    assert bool((error <= scale.unsqueeze(-1) / 2 + 1e-6).all())


def test_int8_pool_holds_more_tokens_in_the_same_memory():
    fp32 = LLM("builtin-tiny", kv_cache_memory="4MiB").engine.stats().kv_blocks_total
    int8 = LLM("builtin-tiny", kv_cache_memory="4MiB", kv_cache_dtype="int8").engine.stats().kv_blocks_total
    # head_dim 16: int8 values + a float32 scale are 20 bytes against 64 in float32.
    assert int8 == pytest.approx(fp32 * 64 / 20, rel=0.02)


@pytest.mark.parametrize("model,dtype", [("llama_gqa", "float32"), ("llama_head64", "bfloat16")])
def test_int8_greedy_agrees_with_unquantized(checkpoints, model, dtype):
    """float32: the int8 cache read by the torch path (dequantized on gather); bf16 with head dim
    64: by the fused attention kernel, where the CPU kernels load, every token, and the whole layer stack for decodes."""
    from punctual.kernels import cpu_kernels

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 70))]}
               for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(**kwargs):
        llm = LLM(str(checkpoints[model]), dtype=dtype, num_kv_blocks=256, max_num_batched_tokens=16, **kwargs)
        if dtype == "bfloat16" and cpu_kernels.load() is not None:
            assert llm.engine.core.runner.attention_kernel == "all"
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.core.check_integrity()
        return outs

    exact, quantized = run(), run(kv_cache_dtype="int8")
    prefixes = []
    for a, b in zip(exact, quantized):
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefixes.append(agree / len(a))
    assert sum(prefixes) / len(prefixes) >= MIN_AGREEING_PREFIX


def test_bad_kv_cache_dtype_is_named():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM("builtin-tiny", kv_cache_dtype="int4")
