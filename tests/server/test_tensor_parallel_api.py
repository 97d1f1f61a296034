"""`punctual serve --tensor-parallel-size 2`: a rank that dies fails the running requests and the
server answers 503; stopping the server leaves no rank behind."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from waiting import wait_until

pytestmark = pytest.mark.slow  # a server and its rank processes each test

MODEL = "builtin-tiny"  # 4 heads, 2 KV heads: 2 ranks split both
LONG_STREAM = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True,
               "stream": True}


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


def rank_pids(engine_pid: int) -> list[int]:
    """The core's rank processes (its children running rank_main)."""
    return [pid for pid in children(engine_pid) if "rank_main" in Path(f"/proc/{pid}/cmdline").read_text()]


def test_a_dead_rank_fails_requests_with_503_and_stop_leaves_no_rank(launch_server):
    server = launch_server("--tensor-parallel-size", "2")
    ranks = wait_until(lambda: rank_pids(server.engine_pid), 30, "no rank process under the engine core")
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{server.url}/v1/completions",
                         json={"model": MODEL, "prompt": "hi", "max_tokens": 4}).status_code == 200
        with http.stream("POST", f"{server.url}/v1/completions", json=LONG_STREAM) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            for pid in ranks:
                os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert any(line.startswith('data: {"error"') for line in rest), rest[-3:]
        response = http.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert "rank 1" in response.json()["error"]["message"]
    assert server.stop() == 0
    wait_until(lambda: all(gone(pid) for pid in ranks), 30, "a rank outlived the server")


def test_sigterm_to_the_server_leaves_no_rank(launch_server):
    server = launch_server("--tensor-parallel-size", "2")
    ranks = wait_until(lambda: rank_pids(server.engine_pid), 30, "no rank process under the engine core")
    assert server.stop() == 0
    wait_until(lambda: all(gone(pid) for pid in ranks + [server.engine_pid]), 30,
               "the engine core or a rank outlived the server")
