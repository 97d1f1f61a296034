"""LoRA adapters over HTTP: --enable-lora --lora-modules, a request's `model` picks its adapter
(greedy text as PEFT's merged model's), /v1/models lists adapters, load/unload behind the API key,
and the errors a client gets."""
from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("peft")

from hf_models import build_hf_checkpoint, build_peft_adapter, hf_greedy  # noqa: E402

KEY = "sk-lora"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [5, 17, 99, 3, 250, 1000, 7, 42, 11]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(launch_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-api")
    base = build_hf_checkpoint(root / "base", "llama_gqa")
    adapters = {name: build_peft_adapter(base, root / name, targets, seed)
                for name, targets, seed in (("alpha", ["q_proj", "v_proj", "down_proj"], 1),
                                            ("beta", ["k_proj", "o_proj", "gate_proj", "up_proj"], 2),
                                            ("gamma", ["q_proj", "up_proj"], 3))}
    big = build_peft_adapter(base, root / "big", ["q_proj"], 4, rank=32)
    server = launch_server("--dtype", "float32", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                           "--api-key", KEY, "--served-model-name", "base",
                           "--lora-modules", f"alpha={adapters['alpha']}",
                           json.dumps({"name": "beta", "path": str(adapters["beta"]), "base_model_name": "base"}),
                           model=str(base))
    from punctual.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(base)
    references = {**{name: path / "merged" for name, path in adapters.items()}, "base": base}
    expected = {name: tokenizer.decode(hf_greedy(path, [PROMPT], NEW_TOKENS)[0]) for name, path in references.items()}
    return server, adapters, big, expected


def complete(server, model: str, max_tokens: int = NEW_TOKENS) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True})


def post(server, route: str, body: dict, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", headers=headers, json=body, timeout=60)


def test_models_lists_adapters_with_their_parent(setup):
    server, adapters, _, _ = setup
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["base"]["parent"] is None
    for name in ("alpha", "beta"):
        assert by_id[name]["parent"] == "base" and by_id[name]["root"] == str(adapters[name])


def test_model_field_selects_the_adapter(setup):
    server, _, _, expected = setup
    assert len({expected[name] for name in ("base", "alpha", "beta")}) == 3  # the adapters change the text
    for name in ("base", "alpha", "beta"):
        response = complete(server, name)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == name and body["choices"][0]["text"] == expected[name]


def test_load_use_and_unload_an_adapter(setup):
    server, adapters, _, expected = setup
    assert complete(server, "gamma").status_code == 404
    assert post(server, "load_lora_adapter", {"lora_name": "gamma", "lora_path": str(adapters["gamma"])},
                headers={}).status_code == 401
    response = post(server, "load_lora_adapter", {"lora_name": "gamma", "lora_path": str(adapters["gamma"])})
    assert response.status_code == 200, response.text
    assert complete(server, "gamma").json()["choices"][0]["text"] == expected["gamma"]
    # Unloading while a request runs under it: the request finishes, later ones get 404.
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "gamma", "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert post(server, "unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    response = complete(server, "gamma")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = post(server, "unload_lora_adapter", {"lora_name": "gamma"})
    assert response.status_code == 404 and "gamma" in response.json()["error"]["message"]


def test_bad_adapters_are_400s_naming_the_problem(setup, tmp_path):
    server, adapters, big, expected = setup
    cases = [({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, "no adapter_config.json"),
             ({"lora_name": "x", "lora_path": str(big)}, "rank 32 is above max_lora_rank 8"),
             ({"lora_name": "alpha", "lora_path": str(adapters["gamma"])}, "already loaded"),
             ({"lora_name": "base", "lora_path": str(adapters["gamma"])}, "base model"),
             ({"lora_name": "x"}, "lora_path")]
    for body, message in cases:
        response = post(server, "load_lora_adapter", body)
        assert response.status_code == 400, response.text
        assert message in json.dumps(response.json()["error"]), (message, response.text)
    # Nothing loaded was disturbed.
    assert complete(server, "alpha").json()["choices"][0]["text"] == expected["alpha"]
    response = complete(server, "x")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_lora_metrics(setup):
    server, _, _, _ = setup
    assert complete(server, "alpha").status_code == 200
    assert server.metric("punctual_lora_adapters_loaded") >= 2  # alpha and beta, loaded at start
    assert server.metric("punctual_lora_loads_total") >= 2
