"""KV that moves between replicas of a real server on a local Ray instance: a stream drained to
another replica mid-generation, and prefill/decode disaggregation over each KV transport, all
identical to one engine."""
from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.cluster.test_cluster_server import BODY, alive, descendants, server_conftest, stream_text
from waiting import wait_until

pytestmark = pytest.mark.slow  # Ray clusters started per test: minutes; the quick loop skips them

# A stream to drain: long enough that it is still generating when the drain's last copy round
# reaches its replica. With BODY's 160 tokens (about 0.15 s of decoding on an idle machine, the
# drain's rounds about 0.05 s) a loaded machine finished the stream first: "migrated 0".
LONG_BODY = {**BODY, "max_tokens": 960}  # builtin-tiny's max_model_len is 1024


def greedy_text(body: dict) -> str:
    """One engine's greedy text for `body` (no replicas, no Ray)."""
    from punctual import LLM, SamplingParams

    llm = LLM("builtin-tiny")
    params = SamplingParams(temperature=0, max_tokens=body["max_tokens"], ignore_eos=True)
    return llm.generate([body["prompt"]], params, use_tqdm=False)[0].outputs[0].text


@pytest.fixture(scope="module")
def reference() -> str:
    return greedy_text(BODY)


def start(*args: str):
    server = server_conftest.ServerProcess(*args, "--log-level", "warning")
    try:
        server.wait_ready()
    except BaseException:
        stop(server)
        raise
    return server


def stop(server) -> None:
    spawned = descendants(server.process.pid)
    server.stop()
    for pid in spawned:  # never leave Ray behind, even when a test failed
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def wait_idle(url: str) -> list[dict]:
    """/admin/replicas once every replica reports no request and no KV block in use."""
    seen: list[dict] = []

    def idle() -> list[dict]:
        seen[:] = httpx.get(f"{url}/admin/replicas", timeout=5).json()
        return seen if all(r["kv_blocks_used"] == 0 and r["running"] + r["waiting"] == 0 for r in seen) else []

    return wait_until(idle, message=lambda: f"KV blocks still in use: {seen}", interval=0.1)


def busy_replica(url: str) -> int:
    """The one replica whose core reports a running request (the stream being read: its tokens
    have arrived, so its replica's report, sent after its first step, shows it)."""
    seen: list[dict] = []

    def one_busy() -> list[int]:
        seen[:] = httpx.get(f"{url}/admin/replicas", timeout=5).json()
        busy = [r["id"] for r in seen if r["running"]]
        return busy if len(busy) == 1 else []

    return wait_until(one_busy, message=lambda: f"not one replica running the stream: {seen}")[0]


def test_drain_moves_a_stream_mid_generation():
    reference = greedy_text(LONG_BODY)
    server = start("--replicas", "2")
    try:
        assert stream_text(server.url, LONG_BODY) == reference  # undisturbed, through the cluster
        drained: dict = {}

        def drain_at(count: int) -> None:
            if count == 8 and not drained:  # tokens are streaming: the request runs on a replica
                answer = httpx.post(f"{server.url}/admin/replicas/{busy_replica(server.url)}/drain", timeout=30)
                assert answer.status_code == 200, answer.text
                drained.update(answer.json())

        assert stream_text(server.url, LONG_BODY, drain_at) == reference  # no token lost or duplicated
        moves = httpx.get(f"{server.url}/admin/migrations", timeout=5).json()
        assert drained["migrated"] == 1 and drained["recomputed"] == 0 and drained["left"] == 0, (drained, moves)
        replicas = wait_idle(server.url)
        assert replicas[drained["id"]]["state"] == "drained"
        assert replicas[1 - drained["id"]]["state"] == "ready"
        assert [m["reason"] for m in moves if m["ok"]] == ["drain"], moves
        # Live: most of the KV went over while the stream kept decoding; the stall is one part of the move.
        assert moves[-1]["precopy_blocks"] > 0 and 0 <= moves[-1]["downtime_s"] <= moves[-1]["seconds"]
        # The drained replica gets nothing new.
        assert stream_text(server.url, LONG_BODY) == reference
        replicas = wait_idle(server.url)
        bad = httpx.post(f"{server.url}/admin/replicas/7/drain", timeout=5)
        assert bad.status_code == 400 and "replica_id" in bad.text
        assert "Traceback" not in server.output()
    finally:
        stop(server)


@pytest.mark.parametrize("transport", ["relay", "object-store", "direct"])
def test_prefill_decode_disaggregation_is_identical(reference, transport):
    segments = {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}
    server = start("--prefill-replicas", "1", "--decode-replicas", "1", "--kv-transport", transport)
    try:
        assert stream_text(server.url, BODY) == reference
        whole = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=60).json()
        assert whole["choices"][0]["text"] == reference
        moves = httpx.get(f"{server.url}/admin/migrations", timeout=5).json()
        assert [(m["reason"], m["source"], m["target"], m["ok"]) for m in moves] == [("disaggregation", 0, 1, True)] * 2
        assert {m["transport"] for m in moves} == {transport} and moves[-1]["estimate"]["observations"] >= 2
        replicas = wait_idle(server.url)  # every block free again on both (and each core checked its integrity)
        assert {name for name in os.listdir("/dev/shm") if name.startswith("psm_")} <= segments
        assert [r["role"] for r in replicas] == ["prefill", "decode"]
        assert "Traceback" not in server.output()
    finally:
        stop(server)
