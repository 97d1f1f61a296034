"""Build and load the fused CPU decode kernels as torch.ops.punctual.*, in the variant this CPU runs.

Two sources give the same ops (names, signatures, packed weight layouts), so the model code does not
know which it runs:
- "avx512": csrc/cpu_kernels.cpp, AVX-512 BF16 dot products and VNNI, for CPUs with avx512f/bw/vl/dq,
  avx512_bf16 and avx512_vnni (every CPU with the BF16 extension has VNNI);
- "avx2" (x86 with AVX2 and FMA) and "neon" (aarch64): csrc/cpu_kernels_portable.cpp, the same
  math over 8-lane fp32 vectors, compiled for that target only.
Both share the thread team and decode_stack (csrc/team.h, csrc/stack.h). The best variant the CPU
has is chosen; PUNCTUAL_KERNELS_ISA=avx512|avx2|neon forces one (e.g. the AVX2 build on an AVX-512
machine, to test it), and =auto (or unset) chooses.

The library is compiled once per (variant, sources, torch version, compiler, flags) with the system
C++ compiler against the installed torch's headers, into PUNCTUAL_CACHE/kernels/<variant>-<key>/,
and loaded from there on later starts (a few ms). A build takes ~10-20 s on 2 cores. Where no
variant fits the CPU or there is no compiler, `load()` returns None with the reason logged once,
and the model runs its eager path (what `--enforce-eager` asks for).

It links the OpenMP runtime torch ships (libgomp.so.1 in torch/lib), so the kernels' parallel
regions share torch's thread pool and its `torch.set_num_threads`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SHARED_HEADERS = ("team.h", "quest.h", "stack.h", "lora.h", "gemm_prep.h")  # included by both sources: part of every build's key
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-w"]
ISA_ENV = "PUNCTUAL_KERNELS_ISA"


@dataclass(frozen=True)
class Variant:
    name: str
    source: str                 # file under csrc/
    flags: tuple[str, ...]      # target flags on top of COMMON_FLAGS
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags (x86) or Features (aarch64) the build needs
    machines: tuple[str, ...]   # platform.machine() values it compiles for


VARIANTS = {
    "avx512": Variant("avx512", "cpu_kernels.cpp",
                      ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni"),
                      ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"),
                      ("x86_64", "AMD64")),
    # AVX2 and FMA only (no -mavx512*, no -march=native): the build runs on any Haswell-or-later x86
    # CPU, and -ffp-contract=off keeps eager's separate roundings (the kernels fuse where they mean to).
    "avx2": Variant("avx2", "cpu_kernels_portable.cpp", ("-mavx2", "-mfma", "-ffp-contract=off"), ("avx2", "fma"),
                    ("x86_64", "AMD64")),
    # NEON (asimd) is in every aarch64 CPU's baseline: no target flag needed.
    "neon": Variant("neon", "cpu_kernels_portable.cpp", ("-ffp-contract=off",), ("asimd",), ("aarch64", "arm64")),
}
PREFERENCE = ("avx512", "avx2", "neon")  # the first this CPU has is chosen


class KernelsUnavailable(RuntimeError):
    pass


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):  # x86 / aarch64
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_root() -> Path:
    root = os.environ.get("PUNCTUAL_CACHE") or str(Path.home() / ".cache" / "punctual")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def choose_variant(cpu_flags: set[str] | None = None, machine: str | None = None,
                   requested: str | None = None) -> Variant:
    """The build this CPU runs: `requested` (default: $PUNCTUAL_KERNELS_ISA) when it names one, else
    the first of PREFERENCE whose CPU flags are all present. Raises KernelsUnavailable with the
    reason when none fits (or the requested one does not), ValueError for an unknown name."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    machine = platform.machine() if machine is None else machine
    if requested is None:
        requested = os.environ.get(ISA_ENV, "")
    requested = requested.strip().lower()
    if requested not in ("", "auto") and requested not in VARIANTS:
        raise ValueError(f"{ISA_ENV}={requested!r}: expected auto or one of {', '.join(VARIANTS)}")

    def lacks(variant: Variant) -> list[str]:
        if machine not in variant.machines:
            return [f"a {'/'.join(variant.machines)} CPU (this is {machine})"]
        return [f for f in variant.cpu_flags if f not in flags]

    if requested in VARIANTS:
        missing = lacks(VARIANTS[requested])
        if missing:
            raise KernelsUnavailable(f"{ISA_ENV}={requested}: this CPU lacks {', '.join(missing)}")
        return VARIANTS[requested]
    reasons = []
    for name in PREFERENCE:
        missing = lacks(VARIANTS[name])
        if not missing:
            return VARIANTS[name]
        reasons.append(f"{name} needs {', '.join(missing)}")
    raise KernelsUnavailable("no kernel build fits this CPU: " + "; ".join(reasons))


def build(verbose: bool = False, variant: Variant | None = None) -> Path:
    """Compile the library for `variant` (default: choose_variant()) if its cached build is missing;
    returns the .so path. Raises KernelsUnavailable with the reason when it cannot be built here."""
    if sys.platform != "linux":
        raise KernelsUnavailable(f"the CPU kernels are built for Linux only, not {sys.platform}")
    variant = variant or choose_variant()
    cxx = _compiler()
    if cxx is None:
        raise KernelsUnavailable("no C++ compiler (g++) on PATH")
    from torch.utils import cpp_extension

    source = CSRC / variant.source
    flags = COMMON_FLAGS + list(variant.flags)
    texts = [source.read_bytes()] + [(CSRC / header).read_bytes() for header in SHARED_HEADERS]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(b"\0".join([*texts, torch.__version__.encode(), cxx.encode(), " ".join(flags).encode(),
                                     str(abi).encode()])).hexdigest()[:16]
    target = _cache_root() / f"{variant.name}-{key}" / "punctual_cpu_kernels.so"
    if target.exists():
        return target
    torch_lib = cpp_extension.library_paths()[0]
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load a half-written file.
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source), "-o", scratch,
               f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-lgomp"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(scratch)
        raise KernelsUnavailable(f"compiling the CPU kernels ({variant.name}) failed: {exc}") from exc
    if result.returncode != 0:
        os.unlink(scratch)
        raise KernelsUnavailable(f"compiling the CPU kernels ({variant.name}) failed:\n{result.stderr[-2000:]}")
    os.replace(scratch, target)
    logger.info("built the %s CPU decode kernels in %.1f s: %s", variant.name, time.perf_counter() - start, target)
    if verbose:
        print(f"built {target} ({variant.name}) in {time.perf_counter() - start:.1f} s")
    return target


@functools.cache
def _load() -> tuple[object, str | None]:
    try:
        variant = choose_variant()
        path = build(variant=variant)
        torch.ops.load_library(str(path))
    except (KernelsUnavailable, OSError, RuntimeError) as exc:
        logger.warning("fused CPU kernels unavailable, running eager: %s", exc)
        return None, None
    logger.info("fused CPU kernels: the %s build (%s)", variant.name, variant.source)
    return torch.ops.punctual, variant.name


def load():
    """torch.ops.punctual once the library is loaded, or None (reason logged) where it cannot be.
    One build per process: the ops' names are registered once."""
    return _load()[0]


def loaded_variant() -> str | None:
    """Which build load() loaded ("avx512", "avx2" or "neon"), or None where the kernels are unavailable."""
    return _load()[1]


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
