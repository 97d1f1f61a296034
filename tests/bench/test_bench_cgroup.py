"""The memory cgroup the weight-window benchmark runs peers in: a child in a limited group is held
under the limit while it reads more than the limit through a file mapping (its page cache is
reclaimed, not charged beyond the limit), and the group is gone afterwards."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from punctual.bench.cgroup import MemoryCgroup, evict_file, memory_controller_writable

pytestmark = pytest.mark.skipif(not memory_controller_writable(),
                                reason="no writable cgroup-v1 memory controller on this machine")

LIMIT = 48 << 20
# Reads every page of a file through mmap; prints the bytes it read.
TOUCH = """
import mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    total = sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))
    print(len(m))
"""


def test_a_child_reading_a_mapping_larger_than_the_limit_stays_under_it(tmp_path):
    path = tmp_path / "weights.bin"  # on disk, not tmpfs: its pages are page cache the kernel can evict
    with open(path, "wb") as f:
        for _ in range(3 * LIMIT >> 20):
            f.write(os.urandom(1 << 20))
    evict_file(path)  # else the pages stay charged to this process and the child maps them for free
    with MemoryCgroup(f"punctual-test-{os.getpid()}", limit_bytes=LIMIT) as group:
        out = subprocess.run(group.wrap([sys.executable, "-c", TOUCH, str(path)]),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == 3 * LIMIT  # it did read three times the limit
        # Held at the limit: charged up to it (the child was in the group and its page cache
        # counted), never past it, with pages reclaimed on the way.
        assert LIMIT // 2 < group.max_usage_bytes <= LIMIT
        assert group.stat()["pgpgout"] > 0
        path_of_group = group.path
    assert not path_of_group.exists()


def test_the_group_is_removed_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with MemoryCgroup(f"punctual-test-err-{os.getpid()}", limit_bytes=LIMIT) as group:
            path_of_group = group.path
            raise RuntimeError("boom")
    assert not path_of_group.exists()


def test_a_bad_limit_is_refused():
    with pytest.raises(ValueError, match="limit_bytes"):
        MemoryCgroup("x", limit_bytes=0)
