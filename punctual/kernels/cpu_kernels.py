"""Build and load the fused CPU decode kernels (csrc/cpu_kernels.cpp) as torch.ops.punctual.*.

The library is compiled once per (source, torch version, compiler, CPU flags) with the system C++
compiler against the installed torch's headers, into PUNCTUAL_CACHE/kernels/<key>/, and loaded
from there on later starts (a few ms). A build takes ~10-20 s on 2 cores. It needs a C++
compiler and a CPU with AVX-512 BF16 and VNNI (every CPU with the first has the second); where
either is missing, `load()` returns None with the reason logged once, and the model runs its
eager path (what `--enforce-eager` asks for).

It links the OpenMP runtime torch ships (libgomp.so.1 in torch/lib), so the kernels' parallel
regions share torch's thread pool and its `torch.set_num_threads`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-w"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")


class KernelsUnavailable(RuntimeError):
    pass


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_root() -> Path:
    root = os.environ.get("PUNCTUAL_CACHE") or str(Path.home() / ".cache" / "punctual")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(verbose: bool = False) -> Path:
    """Compile the library if its cached build is missing; returns the .so path. Raises
    KernelsUnavailable with the reason when it cannot be built here."""
    if sys.platform != "linux":
        raise KernelsUnavailable(f"the CPU kernels are built for Linux only, not {sys.platform}")
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise KernelsUnavailable(f"this CPU lacks {', '.join(missing)}")
    cxx = _compiler()
    if cxx is None:
        raise KernelsUnavailable("no C++ compiler (g++) on PATH")
    from torch.utils import cpp_extension

    source = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in sorted(SOURCE.parent.glob("*.h")))  # headers too
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(b"\0".join([source, torch.__version__.encode(), cxx.encode(), " ".join(FLAGS).encode(),
                                     str(abi).encode()])).hexdigest()[:16]
    target = _cache_root() / key / "punctual_cpu_kernels.so"
    if target.exists():
        return target
    torch_lib = cpp_extension.library_paths()[0]
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load a half-written file.
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE), "-o", scratch,
               f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-lgomp"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(scratch)
        raise KernelsUnavailable(f"compiling the CPU kernels failed: {exc}") from exc
    if result.returncode != 0:
        os.unlink(scratch)
        raise KernelsUnavailable(f"compiling the CPU kernels failed:\n{result.stderr[-2000:]}")
    os.replace(scratch, target)
    logger.info("built the CPU decode kernels in %.1f s: %s", time.perf_counter() - start, target)
    if verbose:
        print(f"built {target} in {time.perf_counter() - start:.1f} s")
    return target


@functools.cache
def load():
    """torch.ops.punctual once the library is loaded, or None (reason logged) where it cannot be."""
    try:
        path = build()
        torch.ops.load_library(str(path))
    except (KernelsUnavailable, OSError, RuntimeError) as exc:
        logger.warning("fused CPU kernels unavailable, running eager: %s", exc)
        return None
    return torch.ops.punctual


def int8_kv_attention_supported(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether paged_attention reads an int8 KV cache for this head shape: its specialised loops
    (head dim 64 or 128, at most 8 query heads per KV head) take int8 rows, the generic one does not."""
    return head_dim in (64, 128) and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 8


def unavailable_reason() -> str | None:
    """Why load() returns None here, or None when the kernels load."""
    try:
        build()
    except KernelsUnavailable as exc:
        return str(exc)
    return None


if __name__ == "__main__":  # python -m punctual.kernels.cpu_kernels: build now (e.g. in a Docker layer)
    print(build(verbose=True))
