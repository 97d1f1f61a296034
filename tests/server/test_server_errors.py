"""Bad input gets a 4xx in OpenAI's error shape; a client that hangs up frees its KV blocks."""
from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from waiting import wait_until

MODEL = "builtin-tiny"
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Hello"}]
LONG_TEXT = "word " * 2000  # well past the 1024-token window of builtin-tiny

BAD_COMPLETIONS = [
    ({"prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": LONG_TEXT}, 400, "prompt"),
    ({"prompt": list(range(1, 1100))}, 400, "prompt"),
    ({"prompt": PROMPT, "n": 1000}, 400, "n"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "", "stream": True}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [5000, 1]}, 400, "prompt"),
    ({"prompt": 42}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ({"prompt": PROMPT, "logprobs": 50}, 400, "logprobs"),
    ({"prompt": PROMPT, "stop": [""]}, 400, "stop"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"prompt": PROMPT, "ttft_slo_ms": -5}, 400, "ttft_slo_ms"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
]
BAD_CHATS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "messages"),
    ({"messages": CHAT, "top_logprobs": 5}, 400, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": CHAT, "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": CHAT, "n": 17, "stream": True}, 400, "n"),
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("body,status,param", BAD_COMPLETIONS)
def test_bad_completion_requests(server, body, status, param):
    response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, **body}, timeout=10)
    assert_openai_error(response, status, param)


@pytest.mark.parametrize("body,status,param", BAD_CHATS)
def test_bad_chat_requests(server, body, status, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=10)
    assert_openai_error(response, status, param)


@pytest.mark.parametrize("content", [b'{"prompt": "hi",', b'{"prompt": "\xff\xfe"}', b"[1, 2]", b"\xc3\x28"])
def test_malformed_bodies(server, content):
    response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=10,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_openai_client_sees_the_errors(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10**6)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)


def test_unknown_route_is_an_openai_404(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)


def wait_for_blocks_freed(server) -> None:
    wait_until(lambda: server.metric("punctual_kv_blocks_used") == 0,
               message="KV blocks still in use after the client left")


def aborted(server) -> float:
    return server.metric('punctual_requests_finished_total{finish_reason="abort"}', default=0.0)


def test_stream_disconnect_aborts_and_frees_blocks(server):
    before = aborted(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            # Hold the iterator: dropping it mid-stream would close the connection right away.
            lines = response.iter_lines()
            events = 0
            while events < 3:
                events += next(lines).startswith("data: ")
            assert server.metric("punctual_kv_blocks_used") > 0
    wait_for_blocks_freed(server)
    assert aborted(server) == before + 1
    assert server.metric("punctual_num_requests_running") == 0


def test_non_stream_disconnect_aborts_and_frees_blocks(server):
    before = aborted(server)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}).encode()
    # A raw connection, so that the client hangs up once the request runs, not after a guessed delay.
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: server.metric("punctual_kv_blocks_used") > 0, message="the request never started")
    wait_for_blocks_freed(server)
    assert aborted(server) == before + 1


def test_still_healthy_and_serving_after_all_that(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3},
                          timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
