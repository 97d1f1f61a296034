"""A cgroup-v1 memory group around a benchmark's child process: a hard memory limit and the
peak usage the kernel charged to it (anonymous memory and page cache, mapped file pages included).

Page cache is charged to the group that first faults a page in, so a file whose pages are
already cached elsewhere is mapped without a charge: call `evict_file` on what the child will
read before starting it, or the limit does not apply to those pages.

    with MemoryCgroup("bench-llama", limit_bytes=300 << 20) as group:
        subprocess.run(group.wrap(["llama-server", ...]))
        print(group.max_usage_bytes)
"""
from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


def memory_controller_writable(root: Path = CGROUP_MEMORY_ROOT) -> bool:
    """True where a cgroup-v1 memory group can be made here (the controller is mounted and we may
    write to it)."""
    return (root / "memory.limit_in_bytes").exists() and os.access(root, os.W_OK)


class MemoryCgroup:
    """A fresh memory group `root/name`, made on entry and removed on exit (even after an error).

    limit_bytes None: no limit, the group only measures. A child joins through `wrap(command)`,
    which writes the child's own pid to cgroup.procs before exec, so everything the child charges,
    start-up included, is charged here (v1 does not move charges with a process that joins later).
    """

    def __init__(self, name: str, limit_bytes: int | None = None, root: Path = CGROUP_MEMORY_ROOT) -> None:
        if limit_bytes is not None and limit_bytes <= 0:
            raise ValueError(f"limit_bytes: must be positive, got {limit_bytes}")
        if not name or "/" in name:
            raise ValueError(f"name: one path component, got {name!r}")
        self.path = Path(root) / name
        self.limit_bytes = limit_bytes

    def __enter__(self) -> "MemoryCgroup":
        if not memory_controller_writable(self.path.parent):
            raise PermissionError(f"{self.path.parent}: no writable cgroup-v1 memory controller here")
        self.path.mkdir()
        try:
            # Swap would let anonymous memory leave the group's RAM: cap RAM+swap at the same limit
            # where the kernel accounts swap (memsw), so the limit is on memory, not on RAM alone.
            if self.limit_bytes is not None:
                self._write("memory.limit_in_bytes", self.limit_bytes)
                if (self.path / "memory.memsw.limit_in_bytes").exists():
                    self._write("memory.memsw.limit_in_bytes", self.limit_bytes)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def wrap(self, command: list[str]) -> list[str]:
        """`command` run so that it joins this group before it starts (sh writes its pid, then execs)."""
        procs = str(self.path / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *command]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    @property
    def max_usage_bytes(self) -> int:
        """The peak the kernel charged to the group: anonymous memory plus page cache."""
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    @property
    def usage_bytes(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text())

    def stat(self) -> dict[str, int]:
        """memory.stat: cache, rss, pgpgout (pages uncharged: reclaimed or freed), ..."""
        pairs = (line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return {key: int(value) for key, value in pairs}

    @property
    def oom_kills(self) -> int:
        """Processes the OOM killer ended in this group (0 on kernels that do not report it)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the group once its processes are gone (the caller stops them); its page cache
        charges are dropped first (force_empty) so they do not pass to the parent."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout_s
        while self.pids() and time.monotonic() < deadline:  # a killed child may take a moment to leave
            time.sleep(0.05)
        try:
            self._write("memory.force_empty", 0)
        except OSError:
            pass  # busy or unsupported: rmdir still works, the charges move to the parent
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _write(self, file: str, value: int) -> None:
        (self.path / file).write_text(str(value))


def evict_file(path: Path | str) -> None:
    """Drop a file's clean pages from the page cache (pages some process maps stay), so the next
    reader faults them in and is charged for them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_caches() -> bool:
    """Ask the kernel to drop the clean page cache (echo 1 > drop_caches); False where refused."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def process_peak_rss_kb(pid: int) -> int | None:
    """VmHWM of a live process in KiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
