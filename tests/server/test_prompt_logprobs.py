"""Scoring a prompt through the server: echo + logprobs (OpenAI's legacy completions) and vLLM's
prompt_logprobs, as evaluation harnesses use them, against transformers' log-softmax."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.server.conftest import MODEL

PROMPT = [7, 300, 42, 1999, 5, 64, 800, 3, 1024, 77, 12, 450]


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """transformers' float32 logprob of each prompt token given the ones before it."""
    import transformers

    from punctual.checkpoints.builtin import builtin_path

    model = transformers.AutoModelForCausalLM.from_pretrained(builtin_path(MODEL), dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    return [logprobs[i, PROMPT[i + 1]].item() for i in range(len(PROMPT) - 1)]


@pytest.fixture(scope="module")
def chunked(launch_server):
    # Small chunks: the prompt is scored across several prefill steps.
    return launch_server("--max-num-batched-tokens", "8")


def complete(server, **body) -> dict:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_with_zero_tokens_scores_the_prompt_like_transformers(chunked, reference):
    answer = complete(chunked, echo=True, max_tokens=0, logprobs=1, temperature=0)
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(PROMPT)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(reference, abs=1e-4)
    # A harness's loglikelihood of the continuation is the sum of its tokens' logprobs.
    assert sum(logprobs["token_logprobs"][6:]) == pytest.approx(sum(reference[5:]), abs=1e-3)
    assert answer["usage"]["completion_tokens"] == 0
    detokenized = httpx.post(f"{chunked.url}/detokenize", json={"tokens": PROMPT}, timeout=10).json()["prompt"]
    assert choice["text"] == detokenized


def test_prompt_logprobs_extension(chunked, reference):
    choice = complete(chunked, prompt_logprobs=2, max_tokens=1, temperature=0)["choices"][0]
    scored = choice["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(PROMPT)
    for position, entry in enumerate(scored[1:], start=1):
        assert entry[str(PROMPT[position])]["logprob"] == pytest.approx(reference[position - 1], abs=1e-4)
        assert len(entry) in (2, 3)  # the token itself and its top 2 (it may be among them)


def test_echo_then_generate_streamed_and_not(chunked):
    full = complete(chunked, echo=True, max_tokens=3, logprobs=0, temperature=0, ignore_eos=True)["choices"][0]
    assert len(full["logprobs"]["tokens"]) == len(PROMPT) + 3
    plain = complete(chunked, max_tokens=3, temperature=0, ignore_eos=True)["choices"][0]
    assert full["text"].endswith(plain["text"]) and len(full["text"]) > len(plain["text"])
    with httpx.stream("POST", f"{chunked.url}/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": PROMPT, "echo": True, "max_tokens": 3, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == full["text"]


def test_several_token_prompts_score_one_choice_each(chunked, reference):
    answer = complete(chunked, prompt=[PROMPT, PROMPT[:5]], echo=True, max_tokens=0, logprobs=0)
    first, second = sorted(answer["choices"], key=lambda c: c["index"])
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(reference, abs=1e-4)
    assert second["logprobs"]["token_logprobs"][1:] == pytest.approx(reference[:4], abs=1e-4)


def test_scoring_mistakes_are_400s(chunked):
    for body, param in [({"max_tokens": 0}, "max_tokens"), ({"prompt_logprobs": 99}, "prompt_logprobs")]:
        response = httpx.post(f"{chunked.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body},
                              timeout=10)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    chat = httpx.post(f"{chunked.url}/v1/chat/completions", timeout=10, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "prompt_logprobs"
