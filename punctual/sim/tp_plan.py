"""`punctual sim plan --hardware`: how many machines, split by tensor parallelism, serve a model
at a TPOT, for each link latency.

For each link latency and each tensor-parallel degree N (ascending), one rank's roofline
(punctual/sim/hardware.py's rank_profile) must hold its 1/N of the weights and the load's KV in
the machine's memory, and its decode step at the load (`--streams` streams at `--context-len`
tokens each) must take at most the TPOT. The answer per latency is the smallest such N. The
load is a decode batch, not a request rate: for a rate, write the chosen group's profile with
`punctual sim calibrate MODEL --hardware H --tensor-parallel-size N ...` and simulate it with
`punctual sim plan --profile` / `punctual sim run`.
"""
from __future__ import annotations

from dataclasses import dataclass
from punctual.bench.report import table
from punctual.sim.hardware import hardware_preset, model_shape, roofline_profile
from punctual.sim.tensor_parallel import Link, check_split, decode_features, load_link


@dataclass(frozen=True)
class TPPlanConfig:
    """What the tensor-parallel plan searches (fields named as its flags)."""

    model: str
    hardware: str
    tpot_slo_ms: float
    tensor_parallel_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    link_latencies_us: tuple[float, ...] = (50.0, 200.0, 1000.0)
    link_gbps: float = 10.0  # line rate of each machine's link, Gbit/s
    link_profile: str | None = None  # a measured link (bench_allreduce.py --output): replaces both above
    allreduce: str = "star"
    streams: int = 1  # the load: streams decoding at once
    context_len: int = 1024  # tokens of context each stream attends to
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    dtype: str = "bfloat16"
    machine_memory: int | None = None  # bytes; None: the preset's


def links(config: TPPlanConfig) -> list[Link]:
    if config.link_profile:
        return [load_link(config.link_profile, config.allreduce)]
    if not config.link_latencies_us:
        raise ValueError("--link-latency-us: give at least one latency")
    return [Link(us / 1e6, config.link_gbps * 1e9 / 8, config.allreduce) for us in config.link_latencies_us]


def evaluate(config: TPPlanConfig, link: Link, ranks: int) -> dict:
    """One group: does it fit, and its decode step's TPOT and parts at the load."""
    point = {"latency_us": link.latency_s * 1e6, "ranks": ranks, "fits": False, "tpot_ms": None,
             "collectives_ms": None, "weights_gb": None, "reason": ""}
    try:
        profile = roofline_profile(config.model, config.hardware, config.dtype, ranks, link, config.quantization,
                                   config.kv_cache_dtype, config.machine_memory)
    except ValueError as exc:
        point["reason"] = str(exc)
        return point
    point["weights_gb"] = profile.model["weight_bytes"] / 1e9
    kv_needed = config.streams * (config.context_len + 1) * profile.model["kv_bytes_per_token"]
    if kv_needed > profile.kv_memory_bytes:
        point["reason"] = (f"{kv_needed / 1e9:.1f} GB of KV for {config.streams} x {config.context_len} tokens "
                           f"exceeds the {profile.kv_memory_bytes / 1e9:.1f} GB left beside the weights")
        return point
    x = decode_features(config.streams, config.context_len)
    point["fits"] = True
    point["tpot_ms"] = profile.predict(x) * 1000
    point["collectives_ms"] = profile.roofline.collective_seconds(x) * 1000
    return point


def search(config: TPPlanConfig) -> list[tuple[Link, dict | None, list[dict]]]:
    """Per link: the smallest group that fits and meets the TPOT (None: none does), and every
    group tried (ascending, up to that one)."""
    if not config.tpot_slo_ms > 0:
        raise ValueError(f"--tpot-slo-ms must be positive, got {config.tpot_slo_ms}")
    if config.streams < 1:
        raise ValueError(f"--streams must be >= 1, got {config.streams}")
    if config.context_len < 0:
        raise ValueError(f"--context-len must be >= 0, got {config.context_len}")
    shape = model_shape(config.model)
    sizes = sorted(set(config.tensor_parallel_sizes))
    if not sizes:
        raise ValueError("--tensor-parallel-sizes: give at least one size")
    for ranks in sizes:
        check_split(shape, ranks)
    hardware_preset(config.hardware, config.machine_memory)  # a bad name or memory named before any work
    answers = []
    for link in links(config):
        best, tried = None, []
        for ranks in sizes:
            point = evaluate(config, link, ranks)
            point["meets"] = point["fits"] and point["tpot_ms"] <= config.tpot_slo_ms
            tried.append(point)
            if point["meets"]:
                best = point
                break  # the smallest N: larger groups only add machines
        answers.append((link, best, tried))
    return answers


def plan_tensor_parallel(config: TPPlanConfig) -> int:
    """Print every group tried and the smallest N per link latency; 0 if some latency has one, else 1."""
    answers = search(config)
    hw = hardware_preset(config.hardware, config.machine_memory)
    sizes = sorted(set(config.tensor_parallel_sizes))
    rows = [[f"{p['latency_us']:.4g}", str(p["ranks"]), _num(p["weights_gb"], ".1f"), "yes" if p["fits"] else "no",
             _num(p["tpot_ms"], ".0f"), _num(p["collectives_ms"], ".0f"), "yes" if p["meets"] else "no"]
            for _, _, tried in answers for p in tried]
    link = answers[0][0]
    print(f"{config.model} on {config.hardware} machines ({hw.memory_bytes / 2**30:.0f} GiB each, "
          f"{config.dtype if config.quantization == 'none' else config.quantization} weights, KV "
          f"{config.kv_cache_dtype}), {config.streams} stream(s) at "
          f"{config.context_len} tokens of context, TPOT {config.tpot_slo_ms:g} ms, {config.allreduce} all-reduce, "
          f"links of {link.bytes_per_s * 8 / 1e9:.4g} Gbit/s ({link.source}); an ESTIMATE (roofline):")
    print(table(["link latency us", "machines", "weights/machine GB", "fits", "TPOT ms", "of it collectives ms",
                 "meets"], rows))
    for link, best, _ in answers:
        if best is not None:
            print(f"link latency {link.latency_s * 1e6:.4g} us: {best['ranks']} machine(s), TPOT "
                  f"{best['tpot_ms']:.0f} ms ({best['collectives_ms']:.0f} ms of it all-reduces and the logit all-"
                  "gather)")
        else:
            print(f"link latency {link.latency_s * 1e6:.4g} us: no group of {', '.join(map(str, sizes))} machines "
                  f"meets TPOT {config.tpot_slo_ms:g} ms: {why_not(config, link, sizes)}")
    return 0 if any(best for _, best, _ in answers) else 1


def why_not(config: TPPlanConfig, link: Link, sizes: list[int]) -> str:
    """The reason no group meets the ask: memory, or the collectives' latency floor, or too slow."""
    points = [evaluate(config, link, ranks) for ranks in sizes]
    fitting = [p for p in points if p["fits"]]
    if not fitting:
        return f"none fits in memory (at {sizes[-1]}: {points[-1]['reason']})"
    fastest = min(fitting, key=lambda p: p["tpot_ms"])
    said = (f"the fastest that fits, {fastest['ranks']} machine(s), takes {fastest['tpot_ms']:.0f} ms a token, "
            f"{fastest['collectives_ms']:.0f} ms of it in collectives")
    if fastest["collectives_ms"] >= config.tpot_slo_ms / 2:
        rounds = "2 rounds each whatever the group's size" if config.allreduce == "star" else \
            "2 (N - 1) rounds each"
        return (said + f" (2 all-reduces per layer, {rounds}, each round paying the link's latency; more "
                "machines only add traffic: a link of lower latency is what helps)")
    return said + " (compute and memory bandwidth bound: more machines, or fewer bytes per weight, are what help)"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


__all__ = ["TPPlanConfig", "plan_tensor_parallel"]
