"""A real two-replica server (`punctual serve builtin-tiny --replicas 2`) on a local Ray instance."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from punctual.engine.trace import TRACE_ENV, replica_trace_path
from punctual.sim.trace import read_traces
from waiting import wait_until

pytestmark = pytest.mark.slow  # a Ray cluster of two replicas: minutes; the quick loop skips it

# The subprocess server fixture of the server tests, reused as is.
_spec = importlib.util.spec_from_file_location("server_conftest", Path(__file__).parent.parent / "server" / "conftest.py")
server_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(server_conftest)

BODY = {"model": "builtin-tiny", "prompt": "the quick brown fox jumps over", "max_tokens": 160,
        "temperature": 0, "ignore_eos": True}


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (Ray's raylet, GCS, workers and our replicas)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Each replica traces its steps (`punctual sim calibrate --server --replicas`): passive.
    trace = str(tmp_path_factory.mktemp("trace") / "steps.jsonl")
    server = server_conftest.ServerProcess("--replicas", "2", "--log-level", "warning", env={TRACE_ENV: trace})
    server.trace = trace
    try:
        server.wait_ready()
        yield server
    finally:
        spawned = descendants(server.process.pid)
        server.stop()
        for pid in spawned:  # never leave Ray behind, even when a test failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def stream_text(url: str, body: dict, on_token=None) -> str:
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            pieces.append(event["choices"][0]["text"])
            if on_token is not None:
                on_token(len(pieces))
    return "".join(pieces)


def test_serves_and_reports_replicas(cluster):
    whole = httpx.post(f"{cluster.url}/v1/completions", json=BODY, timeout=60).json()
    assert whole["usage"]["completion_tokens"] == 160
    assert stream_text(cluster.url, BODY) == whole["choices"][0]["text"]
    replicas = httpx.get(f"{cluster.url}/admin/replicas", timeout=5).json()
    assert [r["id"] for r in replicas] == [0, 1]
    assert len({r["pid"] for r in replicas}) == 2 and all(r["state"] == "ready" for r in replicas)
    assert all(r["kv_blocks_total"] > 0 and {"node", "running", "waiting", "kv_blocks_used"} <= set(r) for r in replicas)
    metrics = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    assert 'punctual_kv_blocks_total{replica="0"}' in metrics and 'punctual_kv_blocks_total{replica="1"}' in metrics
    assert httpx.get(f"{cluster.url}/health", timeout=5).json()["status"] == "ok"


def test_each_replica_traces_its_own_steps(cluster):
    """Two streams at once land on both replicas (the second finds the first replica busy), and
    each replica's core writes its steps and requests to a file of its own."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{**BODY, "prompt": f"stream {i} " + BODY["prompt"]} for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(lambda body: stream_text(cluster.url, body), bodies))
    assert all(texts)
    wait_until(lambda: all(os.path.exists(replica_trace_path(cluster.trace, r)) for r in range(2)),
               message="a replica wrote no trace")  # a core writes its trace when it goes idle
    for replica in range(2):
        lines = Path(replica_trace_path(cluster.trace, replica)).read_text().splitlines()
        assert any('"step"' in line for line in lines), f"replica {replica} traced no step"
    trace = read_traces(cluster.trace)
    assert len(trace.adds) >= 2 and len(trace.first_token_sent) >= 2
    assert all(a["received"] >= a["arrival"] for a in trace.adds)  # one monotonic clock across processes


def test_pins_go_to_every_replica(cluster):
    pin = httpx.post(f"{cluster.url}/v1/cache/pin", json={"prompt": "a document " * 40, "pin_id": "doc"}, timeout=30)
    assert pin.status_code == 200 and pin.json()["num_tokens"] > 0, pin.text
    again = httpx.post(f"{cluster.url}/v1/cache/pin", json={"prompt": "a document " * 40, "pin_id": "doc"}, timeout=30)
    assert again.status_code == 409
    assert httpx.post(f"{cluster.url}/v1/cache/unpin", json={"pin_id": "doc"}, timeout=30).status_code == 200
    assert httpx.post(f"{cluster.url}/v1/cache/unpin", json={"pin_id": "doc"}, timeout=30).status_code == 404


def generated_when_idle(cluster) -> dict[str, float] | None:
    """Tokens each ready replica's core has generated, when every replica reports no request (None
    before): a core sends its counters as it goes idle. Callers wait until these include the request
    they care about, since an idle report from before that request may still be the latest."""
    replicas = httpx.get(f"{cluster.url}/admin/replicas", timeout=5).json()
    if any(r["running"] + r["waiting"] for r in replicas):
        return None
    return {str(r["id"]): cluster.metric(f'punctual_engine_generation_tokens_total{{replica="{r["id"]}"}}')
            for r in replicas if r["state"] == "ready"}


def test_replica_killed_mid_stream_loses_no_token(cluster):
    body = {**BODY, "max_tokens": 400}  # long enough to outlast the replicas' next stats (every 0.1 s)
    total_before = sum(wait_until(lambda: generated_when_idle(cluster)).values())
    reference = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    generated_before = wait_until(
        lambda: (g := generated_when_idle(cluster)) and sum(g.values()) == total_before + body["max_tokens"] and g,
        message="the replicas' counters never showed the reference's tokens")
    killed: dict = {}

    def kill_at(count: int) -> None:
        if count == 8 and not killed:
            # A replica reports its load at most every 0.1 s while busy: the one that just finished
            # the reference may still read idle, so wait for the stream's replica to say it is busy.
            def busy() -> list[dict]:
                replicas = httpx.get(f"{cluster.url}/admin/replicas", timeout=5).json()
                return [r for r in replicas if r["running"] + r["waiting"]]

            killed.update(wait_until(busy, message="no replica reported the stream")[0])
            os.kill(killed["pid"], signal.SIGKILL)

    assert stream_text(cluster.url, body, kill_at) == reference  # greedy: as if nothing happened
    assert killed, "no replica was busy"
    # The other replica resumed the stream: it made its last tokens, not all 400 (the killed one had
    # made at least the 8 streamed before the kill).
    survivor = str(1 - killed["id"])
    generated_after = wait_until(
        lambda: (g := generated_when_idle(cluster)) and g[survivor] > generated_before[survivor] and g,
        message="the surviving replica generated nothing")
    resumed_tokens = generated_after[survivor] - generated_before[survivor]
    assert 1 <= resumed_tokens <= body["max_tokens"] - 8, (resumed_tokens, killed)
    # Ray restarts the replica (a new process, which loads the model again) and it rejoins;
    # meanwhile the server is degraded, not down.
    statuses = set()
    replicas: list[dict] = []

    def rejoined() -> bool:
        health = httpx.get(f"{cluster.url}/health", timeout=5)
        assert health.status_code == 200, health.text
        statuses.add(health.json()["status"])
        replicas[:] = httpx.get(f"{cluster.url}/admin/replicas", timeout=5).json()
        return all(r["state"] == "ready" for r in replicas) and killed["pid"] not in {r["pid"] for r in replicas}

    wait_until(rejoined, timeout=60, message=lambda: f"the killed replica did not come back: {replicas}",
               interval=0.2)
    assert "degraded" in statuses
    assert httpx.get(f"{cluster.url}/health", timeout=5).json()["status"] == "ok"
    assert stream_text(cluster.url, body) == reference


def test_sigterm_exits_cleanly_and_leaves_no_ray_process(cluster):
    spawned = descendants(cluster.process.pid)
    assert len(spawned) >= 4  # GCS, raylet, two replicas at least
    assert cluster.stop(timeout=30) == 0  # a deadline: SIGTERM's grace is 5 s, Ray's shutdown a few more

    def left_behind() -> str:
        return f"left behind: {[Path(f'/proc/{p}/cmdline').read_text(errors='replace') for p in spawned if alive(p)]}"

    wait_until(lambda: not any(alive(pid) for pid in spawned), message=left_behind, interval=0.2)
