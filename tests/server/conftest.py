"""Start the real server (`python -m punctual.cli serve builtin-tiny ...`) as a subprocess."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

MODEL = "builtin-tiny"
START_TIMEOUT_S = 300.0  # a deadline, not a measure: the first run builds builtin-tiny; Ray starts slowly on a busy machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, model: str = MODEL):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="punctual-serve-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "punctual.cli", "serve", model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--kv-cache-memory", "64MiB", "--log-level", "warning",
                   "--check-integrity", *args]  # the core checks its invariants whenever it goes idle
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.engine_pid: int | None = None

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=1.0)
                if response.status_code == 200:
                    self.engine_pid = response.json()["engine_pid"]
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy within {START_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def metric(self, name: str, default: float | None = None) -> float:
        """The value of an unlabelled (or first labelled) sample of a Prometheus metric. A metric
        that is missing fails the test, unless the caller gives a `default` (a labelled counter
        has no sample until its first event)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5.0).text
        match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        if match is None:
            assert default is not None, f"metric {name} is missing from /metrics"
            return default
        return float(match.group(1))

    def stop(self, timeout: float = 30.0) -> int | None:  # a deadline for a busy machine
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.engine_pid is not None:  # never leave a core behind, even if the front end was killed
            try:
                os.kill(self.engine_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.log.close()
        return self.process.returncode


    def engine_alive(self) -> bool:
        try:
            os.kill(self.engine_pid, 0)
        except ProcessLookupError:
            return False
        # A zombie still answers signal 0; its state in /proc says it is dead.
        try:
            return Path(f"/proc/{self.engine_pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        except OSError:
            return False


@pytest.fixture(scope="module")
def launch_server():
    """Start servers with extra flags (and environment); all are stopped when the module ends."""
    started: list[ServerProcess] = []

    def launch(*args: str, env: dict[str, str] | None = None, model: str = MODEL) -> ServerProcess:
        started.append(ServerProcess(*args, env=env, model=model))
        return started[-1].wait_ready()

    yield launch
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def server(launch_server):
    """One plain server per test module."""
    return launch_server()
