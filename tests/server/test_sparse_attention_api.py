"""The sparse_attention request field over HTTP: taken by a server started with --sparse-attention
quest (either way), a 400 naming the field on a server that attends densely."""
from __future__ import annotations

import httpx
import pytest

PROMPT = list(range(300, 300 + 70))  # past --sparse-min-context 32: the decodes attend sparsely


@pytest.fixture(scope="module")
def quest(launch_server):
    return launch_server("--sparse-attention", "quest", "--sparse-token-budget", "32", "--sparse-min-context", "32")


def complete(server, route: str = "completions", **fields) -> httpx.Response:
    body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, **fields}
    if route == "completions":
        body["prompt"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": "hello " * 40}]
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60)


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_dense_server_refuses_the_field(server, route):
    response = complete(server, route, sparse_attention=True)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "sparse_attention" and "--sparse-attention" in error["message"]
    assert complete(server, route, sparse_attention=False).status_code == 200


def test_quest_server_takes_the_field_either_way(quest, server):
    for value in (True, False, None):
        response = complete(quest, sparse_attention=value)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    # Turned off, the request attends densely: the dense server's greedy text.
    assert (complete(quest, sparse_attention=False).json()["choices"][0]["text"]
            == complete(server).json()["choices"][0]["text"])


def test_bad_value_is_a_400(quest):
    response = complete(quest, sparse_attention="yes")
    assert response.status_code == 400 and "sparse_attention" in response.text
