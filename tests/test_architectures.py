"""Every architecture of the model registry on the fast paths: the fused bf16 kernels, int8/int4
weights and an int8 KV cache compute the same network as the eager reference."""
from __future__ import annotations

import random

import pytest
import torch

from hf_models import ARCHS, VOCAB
from punctual import LLM, SamplingParams
from punctual.kernels import cpu_kernels
from punctual.models.registry import SUPPORTED_ARCHITECTURES, load_arch_config

NEW_ARCHS = [name for name in ARCHS if not name.startswith(("llama", "mistral", "qwen2_bias"))]


def prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [torch.tensor([lp.logprob for lp in o.prompt_logprobs[1:]]) for o in outs]


PROMPTS = [[random.Random(i).randrange(VOCAB) for _ in range(20 + 9 * i)] for i in range(3)]


def test_the_registry_names_every_architecture(checkpoints):
    for name in ARCHS:
        assert load_arch_config(checkpoints[name]).architecture in SUPPORTED_ARCHITECTURES
    unknown = checkpoints["llama_gqa"].parent / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"architectures": ["FalconForCausalLM"], "model_type": "falcon"}')
    with pytest.raises(ValueError, match="unsupported architecture.*FalconForCausalLM.*supported: .*Qwen3ForCausalLM"):
        load_arch_config(unknown)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_fused_bf16_path_computes_the_eager_network(arch, checkpoints):
    """bf16 through the fused kernels (their features the kernels lack as PyTorch ops in between)
    against eager bf16: the same log-probabilities up to bf16 rounding, chunked and in one go."""
    if cpu_kernels.load() is None:
        pytest.skip(f"no fused kernels here: {cpu_kernels.unavailable_reason()}")
    path = str(checkpoints[arch])
    eager = prompt_logprobs(LLM(path, dtype="bfloat16", num_kv_blocks=64, enforce_eager=True), PROMPTS)
    for chunk in (512, 16):  # one chunk through oneDNN, and chunks through the small-batch GEMM
        fused_llm = LLM(path, dtype="bfloat16", num_kv_blocks=64, max_num_batched_tokens=chunk)
        assert fused_llm.engine.core.runner.model.kernels is not None
        for got, want in zip(prompt_logprobs(fused_llm, PROMPTS), eager):
            torch.testing.assert_close(got, want, atol=0.08, rtol=0.02)


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("variant", [dict(quantization="int8"), dict(quantization="int4"),
                                     dict(kv_cache_dtype="int8")])
def test_quantized_weights_and_kv_rank_like_bf16(arch, variant, checkpoints):
    """int8/int4 weights (experts too) and an int8 KV cache: the prompt's log-probabilities stay
    close to bf16's (a broken layout or a skipped expert would not)."""
    path = str(checkpoints[arch])
    reference = prompt_logprobs(LLM(path, dtype="bfloat16", num_kv_blocks=64), PROMPTS)
    got = prompt_logprobs(LLM(path, dtype="bfloat16", num_kv_blocks=64, **variant), PROMPTS)
    for g, r in zip(got, reference):
        assert (g - r).abs().mean() < 0.25, (arch, variant, (g - r).abs().mean())
