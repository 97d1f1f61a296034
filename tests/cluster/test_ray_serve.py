"""The Ray Serve entry point: punctual.cluster.serve.build_app under serve.run, in a subprocess
(Ray and Serve never start inside the test process)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a Ray Serve application in a subprocess: the quick loop skips it

SCRIPT = """
import json, sys, time, httpx, ray
from ray import serve
from punctual.cluster.serve import build_app
port = int(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=100 << 20,
         log_to_driver=False)
try:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app("builtin-tiny", replicas=2, kv_cache_memory="64MiB"), blocking=False)
    url = f"http://127.0.0.1:{port}"
    replicas = httpx.get(url + "/admin/replicas", timeout=10).json()
    answer = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "builtin-tiny", "prompt": "hi there", "max_tokens": 5, "temperature": 0}).json()
    print("RESULT " + json.dumps({"replicas": replicas, "answer": answer}))
finally:
    serve.shutdown()
    ray.shutdown()
"""


def test_ray_serve_application_serves():
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Ray Serve is not installed (pip install 'ray[serve]'): {exc}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(port)], capture_output=True, text=True, timeout=180)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert len({r["pid"] for r in result["replicas"]}) == 2
    assert result["answer"]["usage"]["completion_tokens"] == 5
