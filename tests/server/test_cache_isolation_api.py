"""Tenants over HTTP: several API keys, prefix-cache isolation by key or by the client's
cache_salt, usage.prompt_tokens_details.cached_tokens, and per-tenant metrics. The deterministic
side of the prompt-caching audit: a second tenant's request for the first tenant's prompt finds
nothing cached (the timing side is benchmarks/audit_prompt_cache.py)."""
from __future__ import annotations

import re

import httpx
import pytest

MODEL = "builtin-tiny"
KEYS = {"key-alice": "alice", "key-alice-2": "alice", "key-bob": "bob"}
PROMPT = list(range(300, 300 + 53))  # 3 full blocks of 16 a repeat can hit


@pytest.fixture(scope="module")
def isolated(launch_server, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# key tenant\n" + "".join(f"{k} {t}\n" for k, t in KEYS.items()))
    return launch_server("--api-key-file", str(key_file), "--api-key", "key-solo",
                         "--prefix-cache-isolation", "api-key")


@pytest.fixture(scope="module")
def shared(launch_server):
    return launch_server()


def complete(server, prompt, key=None, **fields) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30,
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 1, **fields})
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def cached(server, prompt, key=None, **fields) -> int:
    return complete(server, prompt, key, **fields)["prompt_tokens_details"]["cached_tokens"]


def test_a_tenant_never_hits_another_tenants_prompt(isolated):
    prompt = [1] + PROMPT
    assert cached(isolated, prompt, "key-alice") == 0
    assert cached(isolated, prompt, "key-bob") == 0  # alice's blocks are not bob's
    assert cached(isolated, prompt, "key-alice") == 48  # alice's repeat hits
    assert cached(isolated, prompt, "key-alice-2") == 48  # a second key of the same tenant shares
    assert cached(isolated, prompt, "key-bob") == 48  # bob's own copy, now cached
    # A client's cache_salt does not get out of its tenant: the server's isolation overrides it.
    assert cached(isolated, [2] + PROMPT, "key-alice", cache_salt="x") == 0
    assert cached(isolated, [2] + PROMPT, "key-bob", cache_salt="x") == 0
    assert cached(isolated, [2] + PROMPT, "key-alice") == 48
    assert httpx.get(f"{isolated.url}/health").json()["status"] == "ok"  # the core checked its invariants


def test_a_pin_serves_its_tenant_only(isolated):
    document = [3] + PROMPT
    response = httpx.post(f"{isolated.url}/v1/cache/pin", headers={"Authorization": "Bearer key-alice"},
                          json={"prompt_token_ids": document, "pin_id": "doc"}, timeout=30)
    assert response.status_code == 200, response.text
    assert cached(isolated, document + [5], "key-bob") == 0
    assert cached(isolated, document + [5], "key-alice") == 48


def test_every_key_opens_the_routes_and_others_do_not(isolated):
    for key in [*KEYS, "key-solo"]:
        assert complete(isolated, "hi", key)["prompt_tokens"] > 0
    response = httpx.post(f"{isolated.url}/v1/completions", headers={"Authorization": "Bearer nope"},
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=10)
    assert response.status_code == 401


def test_metrics_count_per_tenant(isolated):
    complete(isolated, [4] + PROMPT, "key-bob")
    text = httpx.get(f"{isolated.url}/metrics", timeout=5).text
    prompt_tokens = dict(re.findall(r'^punctual_tenant_prompt_tokens_total\{tenant="([^"]+)"\} (\S+)$', text, re.M))
    assert float(prompt_tokens["bob"]) > 0 and float(prompt_tokens["alice"]) > 0
    assert set(prompt_tokens) <= {"alice", "bob", "key-1"}  # tenants from the key file: bounded labels


def test_cache_salt_without_isolation(shared):
    prompt = [5] + PROMPT
    assert cached(shared, prompt, cache_salt="s1") == 0
    assert cached(shared, prompt, cache_salt="s2") == 0  # a different salt: no sharing
    assert cached(shared, prompt, cache_salt="s1") == 48  # the same salt: shared
    assert cached(shared, prompt) == 0
    assert cached(shared, prompt) == 48  # no salt shares with no salt, as before
    chat = httpx.post(f"{shared.url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "max_tokens": 1, "cache_salt": "s1",
        "messages": [{"role": "user", "content": "a fairly long question " * 8}]}).json()
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_an_empty_cache_salt_is_refused(shared):
    response = httpx.post(f"{shared.url}/v1/completions", timeout=10,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 1, "cache_salt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"
