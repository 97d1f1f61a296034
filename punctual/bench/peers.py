"""Starting the systems a comparison runs: Punctual, llama.cpp's llama-server, and a static-batching
transformers server, each as a subprocess on loopback serving the same checkpoint.

A peer that cannot be started here (not built, not importable, a failed conversion) raises
PeerUnavailable with the reason, and a comparison goes on without it.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Iterator

import httpx

from punctual.bench.loadgen import Endpoint

SYSTEMS = ("punctual", "llama.cpp", "hf-static")
# A system may name a variant after a colon: punctual:int8 / punctual:int4 (--quantization),
# punctual:eager (--enforce-eager); llama.cpp:bf16 / f16 / f32 / q8_0 (its converter's types) /
# q4_0 / q4_1 / q4_k_m (its quantizer, from the bf16 file). Each variant is its own system in a run.
PUNCTUAL_VARIANTS = {"int8": ("--quantization", "int8"), "int4": ("--quantization", "int4"),
                     "eager": ("--enforce-eager",), "batch-invariant": ("--batch-invariant",)}
LLAMA_CPP_CONVERTER_TYPES = ("bf16", "f16", "f32", "q8_0")
LLAMA_CPP_QUANTIZER_TYPES = ("q4_0", "q4_1", "q4_k_m")


class PeerUnavailable(RuntimeError):
    """This system cannot be run here; the message says why and what would fix it."""


@dataclass(frozen=True)
class PeerSpec:
    """How to start one system and talk to it."""

    name: str
    command: list[str]
    port: int
    style: str = "openai"                 # see loadgen.Endpoint.style
    health_path: str = "/health"
    env: dict = field(default_factory=dict)  # added to this process's environment

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self) -> Endpoint:
        return Endpoint(self.base_url, style=self.style)


@dataclass(frozen=True)
class PeerOptions:
    """Settings every system gets in its own terms, so the comparison is like for like."""

    max_num_seqs: int = 32                 # Punctual's batch cap = llama.cpp's slots = the static batch size
    threads: int = os.cpu_count() or 1     # compute threads of each system
    kv_cache_memory: str | None = None     # Punctual's KV pool
    slot_context: int | None = None        # llama.cpp context per slot; default: the model's
    punctual_args: tuple[str, ...] = ()    # extra `punctual serve` flags


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_checkpoint(model: str) -> Path:
    """A checkpoint directory from a path, a .gguf file (converted once) or a built-in name."""
    from punctual.checkpoints.loader import resolve_model_path

    path = resolve_model_path(model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model: no config.json in {path}")
    return path


def thread_env(threads: int) -> dict:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def punctual_peer(model: str, port: int, options: PeerOptions, variant: str | None = None) -> PeerSpec:
    if find_spec("punctual.server") is None:
        raise PeerUnavailable("punctual: punctual.server is not importable, so `punctual serve` cannot run")
    command = [sys.executable, "-m", "punctual.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(options.max_num_seqs), "--log-level", "warning"]
    if options.kv_cache_memory:
        command += ["--kv-cache-memory", options.kv_cache_memory]
    if variant is not None:
        command += list(PUNCTUAL_VARIANTS[variant])
    name = "punctual" if variant is None else f"punctual:{variant}"
    return PeerSpec(name, command + list(options.punctual_args), port, env=thread_env(options.threads))


def llama_cpp_peer(model: str, port: int, options: PeerOptions, variant: str | None = None) -> PeerSpec:
    from punctual.bench import llama_cpp

    binary = llama_cpp.server_binary()
    if binary is None:
        raise PeerUnavailable("llama.cpp: llama-server is not built; run `punctual bench build-llama-cpp` "
                              f"(about 10 minutes on 2 cores; it goes to {llama_cpp.llama_cpp_dir()})")
    checkpoint = resolve_checkpoint(model)
    config = json.loads((checkpoint / "config.json").read_text())
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    outtype = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype, "f32")
    try:
        if variant in LLAMA_CPP_QUANTIZER_TYPES:
            gguf = llama_cpp.quantize_gguf(llama_cpp.convert_to_gguf(checkpoint, "bf16"), variant)
        else:
            gguf = llama_cpp.convert_to_gguf(checkpoint, variant or outtype)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        raise PeerUnavailable(f"llama.cpp: converting {checkpoint} to GGUF ({variant or outtype}) failed: {exc}") from None
    slot_context = options.slot_context or int(config.get("max_position_embeddings", 2048))
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               # One KV stream per slot (llama.cpp's default with an explicit -np): with
               # --kv-unified every decode attends over the whole shared buffer, other slots'
               # cells included (masked), which slows decoding as the buffer fills.
               "-np", str(options.max_num_seqs), "-c", str(slot_context * options.max_num_seqs),
               "-t", str(options.threads), "-tb", str(options.threads), "--no-webui"]
    return PeerSpec("llama.cpp" if variant is None else f"llama.cpp:{variant}", command, port, style="llama.cpp")


def hf_static_peer(model: str, port: int, options: PeerOptions) -> PeerSpec:
    command = [sys.executable, "-m", "punctual.bench.hf_server", model, "--port", str(port),
               "--max-batch-size", str(options.max_num_seqs), "--threads", str(options.threads)]
    return PeerSpec("hf-static", command, port, env=thread_env(options.threads))


PEER_BUILDERS = {"punctual": punctual_peer, "llama.cpp": llama_cpp_peer, "hf-static": hf_static_peer}


def check_system(system: str) -> None:
    """Raise ValueError naming what is wrong with a --systems entry."""
    base, _, variant = system.partition(":")
    if base not in PEER_BUILDERS:
        raise ValueError(f"systems: unknown {system!r}; choose from {', '.join(SYSTEMS)}")
    variants = {"punctual": tuple(PUNCTUAL_VARIANTS), "llama.cpp": LLAMA_CPP_CONVERTER_TYPES + LLAMA_CPP_QUANTIZER_TYPES,
                "hf-static": ()}[base]
    if variant and variant not in variants:
        raise ValueError(f"systems: {base} has no variant {variant!r}; choose from {', '.join(variants) or 'none'}")


def peer_spec(system: str, model: str, options: PeerOptions, port: int | None = None) -> PeerSpec:
    check_system(system)
    base, _, variant = system.partition(":")
    if variant:
        return PEER_BUILDERS[base](model, port or free_port(), options, variant)
    return PEER_BUILDERS[base](model, port or free_port(), options)


@contextmanager
def running(spec: PeerSpec, log_path: Path, startup_timeout_s: float = 600.0) -> Iterator[Endpoint]:
    """Start the peer, wait until its health check answers 200, yield its endpoint, stop it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(spec.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **spec.env}, start_new_session=True,
                                   preexec_fn=_terminate_with_parent)
        try:
            wait_healthy(spec, process, log_path, startup_timeout_s)
            yield spec.endpoint()
        finally:
            stop(process)


def _terminate_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the benchmark that started it dies. A bench
    killed by `timeout` runs no finally blocks, and its llama-server once kept serving the dead
    client's queue for 20 minutes, under the next benchmarks' timings."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_healthy(spec: PeerSpec, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = spec.base_url + spec.health_path
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PeerUnavailable(f"{spec.name}: exited with {process.returncode} while starting; "
                                      f"log {log_path}:\n{tail(log_path)}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise PeerUnavailable(f"{spec.name}: not healthy after {timeout_s:.0f} s; log {log_path}:\n{tail(log_path)}")


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the peer's process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""
