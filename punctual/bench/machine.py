"""The line every benchmark prints about the machine it ran on: lscpu's model name and the vector
flags that decide which kernels run (the machine changes between sessions; results quote it)."""
from __future__ import annotations

import os
import subprocess

KERNEL_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c")


def cpu_line() -> str:
    """lscpu's model name, the CPU count and the avx/amx/fma flags; says so where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = [f for f in fields.get("Flags", "").split() if f.startswith(KERNEL_FLAG_PREFIXES)]
    return f"{fields.get('Model name', '?').strip()} ({os.cpu_count()} CPUs); flags: {' '.join(flags) or '-'}"
