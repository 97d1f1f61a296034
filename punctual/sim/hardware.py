"""Roofline estimates of a step's cost on machines not at hand (`punctual sim calibrate --hardware`).

A step reads every weight once and the KV of every context token it attends to, and does two
FLOPs per weight per token plus attention's; its time is the larger of compute at peak FLOP/s
and traffic at peak bandwidth, each derated by an efficiency, plus a fixed per-step overhead.
Every figure below is a vendor peak or a rule of thumb, so the profiles are ESTIMATES: calibrate
on the real machine when you have one. `tensor_parallel_size` > 1 prices one rank of a group
split across that many such machines, joined by a link (punctual/sim/tensor_parallel.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from punctual.sim.profile import Roofline, StepProfile
from punctual.sim.tensor_parallel import MEMORY_RESERVE, WEIGHT_BYTES, Link, rank_costs, tp_roofline

GiB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    description: str
    peak_flops: float  # dense FLOP/s in 16-bit (CPUs: fp32)
    memory_bandwidth: float  # bytes/s
    memory_bytes: int
    flops_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    overhead_s: float = 0.003  # per step: kernel launches, host scheduling and sampling
    dtype_bytes: int = 2
    # Between replicas (KV transfers): the NIC each one has, at ~80% of its line rate, plus a
    # fixed cost per copy (RPC round trips through the cluster client, between two steps).
    interconnect_bytes_per_s: float = 50e9  # 400 Gb/s InfiniBand NDR, one NIC per GPU
    transfer_fixed_s: float = 0.002


# Vendor datasheet peaks (dense, no sparsity); CPU classes from cores x clock x FLOPs per cycle.
HARDWARE = {
    "h100": Hardware("NVIDIA H100 SXM 80GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 400 Gb/s NDR", 989e12, 3.35e12,
                     80 * 10**9),
    "h200": Hardware("NVIDIA H200 141GB: 989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e, 400 Gb/s NDR", 989e12, 4.8e12,
                     141 * 10**9),
    "a100": Hardware("NVIDIA A100 SXM 80GB: 312 TFLOP/s bf16 dense, 2.04 TB/s HBM2e, 200 Gb/s HDR", 312e12,
                     2.039e12, 80 * 10**9, interconnect_bytes_per_s=25e9),
    "l4": Hardware("NVIDIA L4 24GB: 121 TFLOP/s bf16 dense, 300 GB/s GDDR6, 100 GbE", 121e12, 300e9, 24 * 10**9,
                   interconnect_bytes_per_s=12.5e9),
    "cpu-2c": Hardware("2 x86 cores, AVX2 at ~2.5 GHz (32 fp32 FLOP/cycle/core), ~20 GB/s, 10 GbE",
                       2 * 2.5e9 * 32, 20e9, 16 * GiB, 0.3, 0.6, 0.01, 4, interconnect_bytes_per_s=1.25e9),
    # A 4-core cloud machine, scaled from PERFORMANCE.md's 2-core measurements (ESTIMATES): memory
    # read 21-28 GB/s on 2 cores (machine B) -> ~42 GB/s on 4, of which a GEMV over weights got ~70%
    # (15 of 21 GB/s); bf16 matmul 730-940 GFLOP/s on 2 AVX-512-bf16 cores (machine A; AMX reached
    # 1,980) -> ~1.7 TFLOP/s on 4, already a measured rate, hence efficiency 0.8; 16 GiB, as the
    # common 4-vCPU size. Weights in bf16 (or --quantization int8/int4), not fp32.
    "cpu-4c": Hardware("4 x86 cores (AVX-512 bf16) at ~2.5 GHz, 16 GiB, ~42 GB/s memory read, 10 GbE: ESTIMATES "
                       "scaled from the 2-core figures of PERFORMANCE.md",
                       1.7e12, 42e9, 16 * GiB, 0.8, 0.7, 0.005, 2, interconnect_bytes_per_s=1.25e9),
    "cpu-16c": Hardware("16 x86 cores, AVX-512 at ~2.5 GHz (64 fp32 FLOP/cycle/core), ~100 GB/s, 25 GbE",
                        16 * 2.5e9 * 64, 100e9, 128 * GiB, 0.3, 0.6, 0.005, 4, interconnect_bytes_per_s=3e9),
    "cpu-64c": Hardware("64 x86 cores, AVX-512 at ~2.5 GHz (64 fp32 FLOP/cycle/core), ~300 GB/s (8-12 channels), "
                        "100 GbE",
                        64 * 2.5e9 * 64, 300e9, 512 * GiB, 0.3, 0.6, 0.005, 4, interconnect_bytes_per_s=12.5e9),
}

# Shapes of well-known checkpoints (their config.json), for estimates without the weights.
KNOWN_SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32768, max_position_embeddings=32768,
                       tie_word_embeddings=False),
    "llama-2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
                        tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192,
                        tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True),
}


def model_shape(model: str) -> dict:
    """config.json fields of a built-in, a known shape, or a checkpoint directory (no weights read)."""
    from punctual.checkpoints.builtin import BUILTIN_SHAPES

    if model in BUILTIN_SHAPES:
        return dict(BUILTIN_SHAPES[model])
    if model in KNOWN_SHAPES:
        return dict(KNOWN_SHAPES[model])
    config = Path(model).expanduser() / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"model {model!r}: not a built-in, a known shape ({', '.join(sorted(KNOWN_SHAPES))}) "
                                "or a directory with config.json")
    return json.loads(config.read_text())


def model_costs(shape: dict, dtype_bytes: int) -> dict:
    """Weights, FLOPs and bytes of the model per unit of each step feature."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    heads = shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or h // heads
    inter, vocab = shape["intermediate_size"], shape["vocab_size"]
    per_layer = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * inter
    layer_params = layers * per_layer
    embed_params = vocab * h * (1 if shape.get("tie_word_embeddings") else 2)
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    return {"layer_params": layer_params, "weight_bytes": (layer_params + embed_params) * dtype_bytes,
            "kv_bytes_per_token": kv_bytes_per_token,
            # FEATURES after "fixed": prefill_tokens, decode_rows, context_tokens, attention_pairs, sampled_rows
            "flops_per": (2.0 * layer_params, 2.0 * layer_params, 0.0, 4.0 * layers * heads * head_dim,
                          2.0 * vocab * h),
            "bytes_per": (float(kv_bytes_per_token), float(kv_bytes_per_token), float(kv_bytes_per_token), 0.0,
                          0.0)}


def hardware_preset(hardware: str, memory_bytes: int | None = None) -> Hardware:
    """The named machine, with its memory replaced where `memory_bytes` is given."""
    if hardware not in HARDWARE:
        raise ValueError(f"--hardware: unknown {hardware!r}; choose from {', '.join(sorted(HARDWARE))}")
    hw = HARDWARE[hardware]
    if memory_bytes is not None:
        if memory_bytes <= 0:
            raise ValueError(f"--machine-memory must be positive, got {memory_bytes}")
        hw = replace(hw, memory_bytes=memory_bytes)
    return hw


def roofline_profile(model: str, hardware: str, dtype: str = "auto", tensor_parallel_size: int = 1,
                     link: Link | None = None, quantization: str | None = None, kv_cache_dtype: str | None = None,
                     memory_bytes: int | None = None) -> StepProfile:
    """The roofline estimate of `model` on `hardware`; with `tensor_parallel_size` N > 1 (or
    int8/int4 weights, int8 KV), one rank's steps of a group of N such machines on `link`."""
    hw = hardware_preset(hardware, memory_bytes)
    shape = model_shape(model)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, hw.dtype_bytes)
    if (tensor_parallel_size != 1 or link is not None or (quantization or "none") != "none"
            or (kv_cache_dtype or "auto") != "auto"):
        return rank_profile(model, shape, hardware, hw, dtype_bytes, tensor_parallel_size, link, quantization,
                            kv_cache_dtype)
    costs = model_costs(shape, dtype_bytes)
    kv_memory = int(hw.memory_bytes * 0.9) - costs["weight_bytes"]
    if kv_memory <= 0:
        raise ValueError(f"{model} ({costs['weight_bytes'] / 1e9:.1f} GB of weights) does not fit in "
                         f"{hardware}'s {hw.memory_bytes / 1e9:.0f} GB")
    roof = Roofline(hw.peak_flops, hw.memory_bandwidth, hw.flops_efficiency, hw.bandwidth_efficiency, hw.overhead_s,
                    costs["flops_per"], float(costs["weight_bytes"]), costs["bytes_per"])
    return StepProfile(
        "roofline", roofline=roof, estimate=True, dtype={4: "float32", 2: "bfloat16"}[dtype_bytes],
        model={"name": model, "shape": shape, "max_model_len": shape.get("max_position_embeddings"),
               "kv_bytes_per_token": costs["kv_bytes_per_token"], "weight_bytes": costs["weight_bytes"]},
        machine={"hardware": hardware, "description": hw.description,
                 "note": "estimate from peak FLOP/s and bandwidth, derated by the efficiencies; not measured"},
        kv_memory_bytes=kv_memory,
        kv_transfer={"fixed_s": hw.transfer_fixed_s, "bytes_per_s": hw.interconnect_bytes_per_s * 0.8,
                     "source": "estimate: the interconnect's line rate at 80%, plus a fixed cost per copy"})


def rank_profile(model: str, shape: dict, hardware: str, hw: Hardware, dtype_bytes: int, ranks: int,
                 link: Link | None, quantization: str | None, kv_cache_dtype: str | None) -> StepProfile:
    """One rank of `ranks` machines `hw` serving `model`, its collectives on `link` (an estimate)."""
    quantization = quantization or "none"
    if quantization not in WEIGHT_BYTES:
        raise ValueError(f"--quantization must be one of {', '.join(WEIGHT_BYTES)}, got {quantization!r}")
    if (kv_cache_dtype or "auto") not in ("auto", "int8"):
        raise ValueError(f"--kv-cache-dtype must be auto or int8, got {kv_cache_dtype!r}")
    if ranks > 1 and link is None:
        raise ValueError("--tensor-parallel-size > 1: give the link (--link-latency-us and --link-gbps, or "
                         "--link-profile)")
    weight_bytes = WEIGHT_BYTES[quantization] or dtype_bytes
    costs = rank_costs(shape, ranks, weight_bytes, 1 if kv_cache_dtype == "int8" else dtype_bytes, dtype_bytes)
    kv_memory = int(hw.memory_bytes * MEMORY_RESERVE - costs.resident_weight_bytes)
    if kv_memory <= 0:
        raise ValueError(f"{model}: a rank's {costs.resident_weight_bytes / 1e9:.1f} GB of weights (1/{ranks} of "
                         f"the layers, {quantization} weights) does not fit in {hardware}'s "
                         f"{hw.memory_bytes / 1e9:.1f} GB; raise --tensor-parallel-size or quantize")
    described = f"{ranks} x {hardware}" if ranks > 1 else hardware
    return StepProfile(
        "roofline", roofline=tp_roofline(costs, hw, link), estimate=True, dtype={4: "float32", 2: "bfloat16"}[
            dtype_bytes],
        model={"name": model, "shape": shape, "max_model_len": shape.get("max_position_embeddings"),
               "kv_bytes_per_token": costs.kv_bytes_per_token, "weight_bytes": costs.resident_weight_bytes,
               "quantization": quantization, "kv_cache_dtype": kv_cache_dtype or "auto"},
        machine={"hardware": described, "description": hw.description, "tensor_parallel_size": ranks,
                 "link": None if link is None else {"latency_s": link.latency_s, "bytes_per_s": link.bytes_per_s,
                                                    "allreduce": link.algorithm, "source": link.source},
                 "note": "estimate of one tensor-parallel rank from peak FLOP/s and bandwidth, derated by the "
                         "efficiencies, plus its collectives on the link; not measured"},
        kv_memory_bytes=kv_memory,
        kv_transfer={"fixed_s": hw.transfer_fixed_s, "bytes_per_s": hw.interconnect_bytes_per_s * 0.8,
                     "source": "estimate: the interconnect's line rate at 80%, plus a fixed cost per copy"})
