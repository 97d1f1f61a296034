"""The server outlives nothing it should not: a dead core is reported at once, SIGTERM exits 0."""
from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest

from waiting import wait_until

pytestmark = pytest.mark.slow  # kills and stops its own servers: a server each test

MODEL = "builtin-tiny"
LONG_STREAM = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True,
               "stream": True}


def test_engine_death_is_detected_and_requests_fail_fast(launch_server):
    server = launch_server()
    # The client's read timeout is the deadline: a front end that missed the death would leave the
    # stream and the requests below hanging, and httpx would raise ReadTimeout.
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=LONG_STREAM) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(server.engine_pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert any(line.startswith('data: {"error"') for line in rest), rest[-3:]

        health = http.get(f"{server.url}/health")
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "engine_unavailable"
        for path, body in [("/v1/completions", {"model": MODEL, "prompt": "hi"}),
                           ("/v1/chat/completions", {"model": MODEL, "stream": True,
                                                     "messages": [{"role": "user", "content": "hi"}]})]:
            response = http.post(f"{server.url}{path}", json=body)
            assert response.status_code == 503
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert server.metric("punctual_engine_alive") == 0
    assert not server.engine_alive()
    assert server.stop() == 0


def test_sigterm_aborts_in_flight_requests_and_exits_0(launch_server):
    server = launch_server("--shutdown-timeout", "1")
    events: list[str] = []

    def stream_until_cut() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG_STREAM, timeout=30) as response:
                for line in response.iter_lines():
                    events.append(line)
        except httpx.HTTPError:
            pass  # the server cut the connection: expected once the grace period is over

    reader = threading.Thread(target=stream_until_cut)
    reader.start()
    wait_until(lambda: any(line.startswith("data: ") for line in events), message="no token streamed")
    server.process.send_signal(signal.SIGTERM)
    # A deadline, not a measurement: past the 1 s grace the server must cut the stream and exit.
    assert server.process.wait(timeout=15) == 0, server.output()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert not server.engine_alive()
    try:
        httpx.get(f"{server.url}/health", timeout=1)
        raise AssertionError("the server still answers after exiting")
    except httpx.ConnectError:
        pass
