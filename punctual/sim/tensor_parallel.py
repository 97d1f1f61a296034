"""Tensor parallelism in the roofline: one model split across N ranks joined by a link.

Each rank holds 1/N of the layer weights and of the LM head (Megatron's split, as
punctual/models/sharding.py does it: the embedding stays whole on every rank), 1/N of the KV
(its KV heads; one replicated head each where the ranks outnumber them) and does 1/N of the
FLOPs. Every layer all-reduces the step's hidden states twice (after o_proj and after the MLP:
rows x hidden x activation bytes each), and the vocabulary's logit slices are all-gathered (as
the engine's decoder does: every rank receives every slice). The collectives sit between the layers' matmuls, so they add to the step's time
rather than hide under it.

A message costs `latency_s + bytes / bytes_per_s` on one rank's link. Two all-reduces:
- star (TPI-LLM's, the default): every rank sends its partial sum to a hub, which sums and sends
  the result back: 2 rounds, each carrying N - 1 messages of the whole tensor through the hub's
  link: 2 x (latency + (N - 1) x bytes / bandwidth). Latency paid twice whatever N is.
- ring (NCCL's, gloo's for large tensors): reduce-scatter then all-gather, 2 (N - 1) rounds of
  bytes / N each: 2 (N - 1) x (latency + bytes / (N x bandwidth)). Less traffic on any link,
  but N - 1 times the latency: it wins only when bandwidth, not latency, bounds the step.
The logit all-gather on a star: the slices into the hub (latency + (N - 1) x slice / bandwidth),
then the whole row of logits out to each other rank (latency + (N - 1) x N x slice / bandwidth);
on a ring, N - 1 rounds of one slice (latency + slice / bandwidth each).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

ALLREDUCE_ALGORITHMS = ("star", "ring")
# Bytes per weight: int8 keeps a scale per output channel (negligible), int4 a bf16 scale per
# group of 32 (punctual/kernels/quant.py's INT4_GROUP_SIZE): 0.5 + 2 / 32.
WEIGHT_BYTES = {"none": None, "int8": 1.0, "int4": 0.5625}
MEMORY_RESERVE = 0.9  # the share of a machine's memory the rank may fill (the OS, activations, buffers)


@dataclass(frozen=True)
class Link:
    """What one rank's link costs per message: `latency_s` each (software stack and wire, one
    way) and `bytes_per_s` through it."""

    latency_s: float
    bytes_per_s: float
    algorithm: str = "star"
    source: str = "given"  # "given" (flags) or where a measurement came from

    def __post_init__(self) -> None:
        if self.algorithm not in ALLREDUCE_ALGORITHMS:
            raise ValueError(f"--allreduce must be one of {', '.join(ALLREDUCE_ALGORITHMS)}, got {self.algorithm!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"--link-latency-us must be >= 0, got {self.latency_s * 1e6:g}")
        if not self.bytes_per_s > 0:
            raise ValueError(f"--link-gbps must be > 0, got {self.bytes_per_s * 8 / 1e9:g}")

    def allreduce_terms(self, ranks: int) -> tuple[float, float]:
        """(seconds per all-reduce, seconds per byte of the reduced tensor) across `ranks`."""
        if ranks <= 1:
            return 0.0, 0.0
        if self.algorithm == "star":
            return 2 * self.latency_s, 2 * (ranks - 1) / self.bytes_per_s
        rounds = 2 * (ranks - 1)
        return rounds * self.latency_s, rounds / (ranks * self.bytes_per_s)

    def gather_terms(self, ranks: int) -> tuple[float, float]:
        """(seconds per all-gather, seconds per byte of one rank's slice) across `ranks`."""
        if ranks <= 1:
            return 0.0, 0.0
        if self.algorithm == "star":
            return 2 * self.latency_s, (ranks - 1) * (ranks + 1) / self.bytes_per_s
        return (ranks - 1) * self.latency_s, (ranks - 1) / self.bytes_per_s

    def allreduce_seconds(self, nbytes: float, ranks: int) -> float:
        fixed, per_byte = self.allreduce_terms(ranks)
        return fixed + nbytes * per_byte


def load_link(path: str | Path, algorithm: str = "star") -> Link:
    """The link measured by `benchmarks/bench_allreduce.py --output` (or `measure_allreduce`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--link-profile: no file {path} (write one with benchmarks/bench_allreduce.py "
                                "--output)")
    try:
        data = json.loads(path.read_text())
        return Link(float(data["latency_s"]), float(data["bytes_per_s"]), algorithm,
                    source=f"measured: {data.get('source', path.name)}")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"--link-profile {path}: not a link measurement ({exc})") from None


@dataclass(frozen=True)
class RankCosts:
    """One rank's share of a model split `ranks` ways."""

    ranks: int
    resident_weight_bytes: float  # held in memory: its layer and head shards, the whole embedding
    read_weight_bytes: float  # read every step: its layer and head shards
    kv_bytes_per_token: float  # its KV heads' share of a token's KV
    layer_flops_per_token: float
    attention_flops_per_pair: float
    head_flops_per_row: float
    allreduce_bytes_per_row: float  # one all-reduce's bytes per row of the step
    gather_bytes_per_row: float  # one rank's logit slice per sampled row (all-gathered)
    num_allreduces: int  # per step with any rows


def check_split(shape: dict, ranks: int) -> None:
    """ValueError naming the numbers when `ranks` cannot split this shape (the engine's own rule,
    punctual/models/sharding.py: heads, KV heads and MLP columns divide evenly)."""
    heads = shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads") or heads
    if ranks < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {ranks}")
    if heads % ranks:
        raise ValueError(f"--tensor-parallel-size {ranks} does not divide the model's {heads} attention heads")
    if kv_heads % ranks and ranks % kv_heads:
        raise ValueError(f"--tensor-parallel-size {ranks} and the model's {kv_heads} KV heads: one must divide "
                         "the other")
    if shape["intermediate_size"] % ranks:
        raise ValueError(f"--tensor-parallel-size {ranks} does not divide the MLP's {shape['intermediate_size']}")


def rank_costs(shape: dict, ranks: int, weight_bytes: float, kv_dtype_bytes: float,
               activation_bytes: float) -> RankCosts:
    check_split(shape, ranks)
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    heads = shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or h // heads
    inter, vocab = shape["intermediate_size"], shape["vocab_size"]
    layer_params = layers * (h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * inter)
    head_params = vocab * h
    shard = (layer_params + head_params) / ranks * weight_bytes
    kv_heads_here = max(1, kv_heads // ranks)  # one replicated head each where ranks outnumber them
    vocab_slice = math.ceil(vocab / ranks)  # padded equal slices (sharding.vocab_slice)
    return RankCosts(
        ranks, resident_weight_bytes=shard + head_params * activation_bytes, read_weight_bytes=shard,
        kv_bytes_per_token=2 * layers * kv_heads_here * head_dim * kv_dtype_bytes,
        layer_flops_per_token=2.0 * layer_params / ranks,
        attention_flops_per_pair=4.0 * layers * heads * head_dim / ranks,
        head_flops_per_row=2.0 * vocab_slice * h,
        allreduce_bytes_per_row=h * activation_bytes, gather_bytes_per_row=vocab_slice * activation_bytes,
        num_allreduces=2 * layers)


def tp_roofline(costs: RankCosts, hw, link: Link | None):
    """A rank's roofline (`punctual.sim.profile.Roofline`) with its collectives priced on `link`."""
    from punctual.sim.profile import Roofline

    kv = float(costs.kv_bytes_per_token)
    ar_fixed, ar_per_byte = link.allreduce_terms(costs.ranks) if link else (0.0, 0.0)
    ga_fixed, ga_per_byte = link.gather_terms(costs.ranks) if link else (0.0, 0.0)
    return Roofline(
        hw.peak_flops, hw.memory_bandwidth, hw.flops_efficiency, hw.bandwidth_efficiency, hw.overhead_s,
        (costs.layer_flops_per_token, costs.layer_flops_per_token, 0.0, costs.attention_flops_per_pair,
         costs.head_flops_per_row),
        float(costs.read_weight_bytes), (kv, kv, kv, 0.0, 0.0),
        allreduce_fixed_s=costs.num_allreduces * ar_fixed,
        allreduce_per_row_s=costs.num_allreduces * costs.allreduce_bytes_per_row * ar_per_byte,
        gather_fixed_s=ga_fixed, gather_per_row_s=costs.gather_bytes_per_row * ga_per_byte)


def decode_features(streams: int, context_len: int) -> tuple[float, ...]:
    """The features of a step decoding one token for each of `streams` streams at `context_len`."""
    return (1.0, 0.0, float(streams), float(streams * (context_len + 1)), float(streams * (context_len + 1)),
            float(streams))
