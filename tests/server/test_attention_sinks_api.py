"""Through the server, a request with attention sinks runs past --max-model-len to its max_tokens."""
from __future__ import annotations

import httpx

from tests.server.conftest import MODEL


def test_streamed_request_runs_past_max_model_len(launch_server):
    server = launch_server("--max-model-len", "32", "--block-size", "4", "--attention-sinks", "4",
                           "--streaming-window", "28")
    prompt = [7, 300, 42, 1999, 5, 64, 800, 3]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice, usage = response.json()["choices"][0], response.json()["usage"]
    assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 48  # 56 tokens > 32

    # Without sinks the same request is refused, naming max_tokens.
    plain = launch_server("--max-model-len", "32", "--block-size", "4")
    response = httpx.post(f"{plain.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
