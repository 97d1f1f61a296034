"""An API key guards /v1; a full queue answers 429 at once instead of queueing without bound."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from waiting import wait_until

MODEL = "builtin-tiny"
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(launch_server):
    # The key comes from the environment, as a deployment would pass a secret.
    return launch_server("--max-queue-len", "2", "--scheduling-policy", "slo", env={"PUNCTUAL_API_KEY": KEY})


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_v1_routes_need_the_key(server, headers):
    for method, path, body in [("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                               ("POST", "/v1/chat/completions",
                                {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})]:
        response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=10)
        assert response.status_code == 401, (path, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_right_key_is_served_and_ops_routes_stay_open(server):
    response = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=30,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id == MODEL
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_admin_routes_need_the_key(server):
    assert httpx.get(f"{server.url}/admin/replicas", timeout=10).status_code == 401
    replicas = httpx.get(f"{server.url}/admin/replicas", headers=AUTH, timeout=10).json()
    assert [(r["id"], r["pid"], r["state"]) for r in replicas] == [(0, server.engine_pid, "ready")]


def test_queue_full_answers_429_at_once(server):
    """Two streams hold the queue's two seats until the three others are answered: the 429s come
    while the seats are taken (a server that queued them instead would answer none of them, and
    the 30 s deadline below would fail the test)."""
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": 1000, "ignore_eos": True, "stream": True}

    async def attempt(http: httpx.AsyncClient, release: asyncio.Event) -> tuple[int, dict | None]:
        async with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code, response.json()
            lines = response.aiter_lines()  # held: dropping it mid-stream would close the connection
            while not (await anext(lines)).startswith("data: "):
                pass
            await release.wait()  # hold the seat until every rejection is in
            return 200, None

    async def run() -> list[tuple[int, dict | None]]:
        release = asyncio.Event()
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as http:
            tasks = [asyncio.create_task(attempt(http, release)) for _ in range(5)]
            results = []  # in the order they were answered
            for next_done in asyncio.as_completed(tasks, timeout=30):
                results.append(await next_done)
                if sum(status == 429 for status, _ in results) == 3:
                    release.set()
            return results

    results = asyncio.run(run())
    assert [status for status, _ in results] == [429, 429, 429, 200, 200]
    for status, body_json in results[:3]:
        assert body_json["error"]["code"] == "queue_full"
        assert set(body_json["error"]) == {"message", "type", "param", "code"}
    # The held streams closed and were aborted: there is room again.
    wait_until(lambda: server.metric("punctual_kv_blocks_used") == 0, message="the closed streams kept their KV blocks")
    response = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=30,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 2})
    assert response.status_code == 200
    too_many = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=30,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 3})
    assert too_many.status_code == 429


@pytest.mark.parametrize("stream", [False, True])
def test_request_whose_slo_cannot_be_met_gets_429(server, stream):
    # A TTFT SLO of a microsecond is already missed on arrival: the slo policy sheds the request.
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "ttft_slo_ms": 0.001, "stream": stream}
    response = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=30)
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "slo_unattainable"
    relaxed = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=30,
                         json={**body, "ttft_slo_ms": 60_000})
    assert relaxed.status_code == 200
    assert server.metric('punctual_slo_outcomes_total{outcome="met",slo="ttft"}') >= 1
