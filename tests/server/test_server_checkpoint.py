"""What the server takes from the checkpoint: its tokenizer (/tokenize, /detokenize) and its sampling defaults."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from punctual.checkpoints.builtin import builtin_path
from punctual.server.protocol import ChatCompletionRequest, CompletionRequest
from punctual.tokenizer import load_tokenizer

KEY = "sk-checkpoint"
NAME = "tiny-with-defaults"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """builtin-tiny, plus a generation_config.json that asks for top_k 1: sampling is then greedy."""
    path = tmp_path_factory.mktemp("defaults") / "tiny"
    shutil.copytree(builtin_path("builtin-tiny"), path)
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.8, "top_k": 1}))
    return path


@pytest.fixture(scope="module")
def server(launch_server, checkpoint):
    return launch_server("--api-key", KEY, "--served-model-name", NAME, model=str(checkpoint))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


def post(server, route: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{route}", json=body, headers=headers, timeout=30.0)


def test_tokenize_prompt_and_detokenize_back(server, tokenizer):
    response = post(server, "/tokenize", {"model": NAME, "prompt": PROMPT, "return_token_strs": True})
    assert response.status_code == 200
    body = response.json()
    assert body["tokens"] == tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    back = post(server, "/detokenize", {"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}


def test_tokenize_messages_through_the_chat_template(server, tokenizer):
    body = post(server, "/tokenize", {"messages": MESSAGES}).json()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    without = post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert without["count"] < body["count"]
    assert post(server, "/tokenize", {"messages": MESSAGES}, key=None).status_code == 401
    assert post(server, "/detokenize", {"tokens": [1]}, key="wrong").status_code == 401


@pytest.mark.parametrize("route,body,status,param", [
    ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 42}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": PROMPT, "model": "other"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 5000]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "hello"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
])
def test_bad_tokenizer_requests(server, route, body, status, param):
    response = post(server, route, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def completion(server, **fields) -> dict:
    response = post(server, "/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 12,
                                                "ignore_eos": True, **fields})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_checkpoint_sampling_defaults_apply_unless_the_request_says(server):
    greedy = completion(server, temperature=0)["text"]
    # Temperature 0.8 and top_k 1 from generation_config.json: sampled, yet greedy.
    assert completion(server)["text"] == greedy
    assert completion(server, temperature=1.0, seed=3)["text"] == greedy
    # The request's own top_k wins: a random model sampled at temperature 1 leaves the greedy path.
    assert completion(server, temperature=1.0, top_k=-1, seed=3)["text"] != greedy


def test_request_fields_left_out_are_distinguished_from_defaults():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    params = CompletionRequest(prompt="x").sampling_params(defaults)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == \
        (0.6, 0.9, 20, 0.0, 1.1)
    params = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=1.0, top_k=-1,
                                   top_p=1.0).sampling_params(defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1.0, 1.0, -1, 1.1)
    params = CompletionRequest(prompt="x").sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, -1, 0.0)
