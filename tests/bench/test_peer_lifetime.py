"""A peer server outlives no benchmark: killed without cleanup, the benchmark takes its peer along."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_peer_dies_with_a_benchmark_killed_without_cleanup():
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "from punctual.bench.peers import _terminate_with_parent\n"
         "child = subprocess.Popen(['sleep', '60'], start_new_session=True, preexec_fn=_terminate_with_parent)\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no finally block, no atexit
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child_pid, 9)
    pytest.fail("the peer outlived the benchmark that started it")
