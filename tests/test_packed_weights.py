"""Weights packed for oneDNN at load (bf16 on CPU) change speed, never tokens."""
from __future__ import annotations

import random

import pytest
import torch

import punctual.models.decoder as llama
from punctual import LLM, SamplingParams


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_packed_and_plain_weights_give_the_same_tokens(monkeypatch):
    if not llama.packing_is_exact(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this PyTorch build has no oneDNN weight packing")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))] for _ in range(6)]
    packed = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=128, enforce_eager=True)  # oneDNN, not the fused kernels
    model = packed.engine.core.runner.model
    assert model.packed and model.layers[0].qkv.is_mkldnn and model.lm_head.is_mkldnn
    assert not model.embed.is_mkldnn  # the tied embedding is still looked up by row
    with_packing = [greedy_tokens(packed, prompts[:1]), greedy_tokens(packed, prompts)]  # one row, and a batch

    monkeypatch.setattr(llama, "packing_is_exact", lambda dtype, device: False)
    plain = LLM("builtin-tiny", dtype="bfloat16", num_kv_blocks=128, enforce_eager=True)
    assert not plain.engine.core.runner.model.packed
    assert with_packing == [greedy_tokens(plain, prompts[:1]), greedy_tokens(plain, prompts)]
