"""The simulated cluster for the engine and cluster flags given and a profile: the KV pool sized
from the profile when the flags do not say, every value checked and named as its flag. The CLI
(sim/cli.py), the planner and `sim validate` all build their simulators here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimFlags:
    """The flags the simulator honours, as given (None: the engine's default, or the profile's
    pool); names and defaults as `punctual serve`'s."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    scheduling_policy: str | None = None
    slo_overload_action: str | None = None
    block_size: int | None = None
    kv_cache_memory: int | str | None = None
    num_kv_blocks: int | None = None  # each replica's pool in blocks (wins over kv_cache_memory)
    max_model_len: int | None = None
    enable_prefix_caching: bool | None = None
    replicas: int = 1
    router: str = "cache_aware"  # as punctual serve's default
    prefill_replicas: int = 0
    decode_replicas: int = 0
    migration: str = "off"  # on: rebalance and make-room moves, as punctual serve --migration on
    migration_threshold: int = 2
    # LoRA (sim/lora.py): requests spread over this many adapters with Zipf popularity; 0: none.
    num_adapters: int = 0
    adapter_zipf: float = 1.0
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    lora_load_ms: float | None = None  # None: sim/lora.py's documented estimates
    lora_swap_ms: float | None = None
    lora_group_ms: float | None = None


def cluster_config(flags: SimFlags, profile, slo=None):
    """The simulated cluster for these flags and this profile (validated, fields named)."""
    from punctual.config import ROUTERS, ClusterConfig, EngineConfig, parse_size
    from punctual.sched.policies import POLICIES
    from punctual.sim.engine import SimConfig

    engine = EngineConfig.from_kwargs(
        "sim", max_num_seqs=flags.max_num_seqs, max_num_batched_tokens=flags.max_num_batched_tokens,
        scheduling_policy=flags.scheduling_policy, slo_overload_action=flags.slo_overload_action,
        block_size=flags.block_size, enable_prefix_caching=flags.enable_prefix_caching,
        max_model_len=flags.max_model_len)
    if engine.scheduler.scheduling_policy not in POLICIES:
        raise ValueError(f"--scheduling-policy must be one of {sorted(POLICIES)}, "
                         f"got {engine.scheduler.scheduling_policy!r}")
    block_size = engine.cache.block_size
    num_blocks = flags.num_kv_blocks
    if num_blocks is not None and num_blocks < 1:
        raise ValueError(f"--num-kv-blocks must be >= 1, got {num_blocks}")
    if num_blocks is None:
        memory = parse_size(flags.kv_cache_memory, "--kv-cache-memory")
        num_blocks = profile.kv_blocks(block_size, memory)
        if num_blocks is None and profile.num_kv_blocks is not None:
            # The calibrated engine's pool, in this block size.
            profiled_block = profile.engine.get("block_size", block_size)
            num_blocks = max(1, profile.num_kv_blocks * profiled_block // block_size)
    if num_blocks is None:
        raise ValueError("--num-kv-blocks or --kv-cache-memory: the profile does not say how big the KV pool is")
    max_model_len = engine.model.max_model_len or profile.max_model_len
    if profile.max_model_len and max_model_len > profile.max_model_len:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's {profile.max_model_len}")
    prefill, decode = flags.prefill_replicas or 0, flags.decode_replicas or 0
    if (prefill or decode) and (prefill < 1 or decode < 1):
        raise ValueError("--prefill-replicas and --decode-replicas must both be >= 1 when either is set, "
                         f"got {prefill} and {decode}")
    if flags.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {flags.replicas}")
    if flags.migration not in ("on", "off"):
        raise ValueError(f"--migration must be on or off, got {flags.migration!r}")
    if flags.migration_threshold < 2:
        raise ValueError(f"--migration-threshold must be >= 2, got {flags.migration_threshold}")
    if flags.router not in ROUTERS:
        raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {flags.router!r}")
    cluster = ClusterConfig(replicas=prefill + decode if prefill else flags.replicas, router=flags.router,
                            prefill_replicas=prefill, decode_replicas=decode, migration=flags.migration == "on",
                            migration_threshold=flags.migration_threshold)
    cluster.validate()
    return SimConfig(engine.scheduler, num_blocks, block_size, engine.cache.enable_prefix_caching, max_model_len,
                     cluster, ttft_slo_ms=None if slo is None else slo.ttft_s * 1000,
                     tpot_slo_ms=None if slo is None else slo.tpot_s * 1000, lora=sim_lora(flags))


def sim_lora(flags: SimFlags):
    """The LoRA settings of these flags (None without --num-adapters); names the flag at fault."""
    from punctual.sim.lora import SimLoRA

    if flags.num_adapters < 0:
        raise ValueError(f"--num-adapters must be >= 0, got {flags.num_adapters}")
    if not flags.num_adapters:
        if flags.max_loras is not None or flags.max_cpu_loras is not None:
            raise ValueError("--max-loras/--max-cpu-loras: only with --num-adapters")
        return None
    costs = {name: getattr(flags, f"lora_{name}_ms") for name in ("load", "swap", "group")}
    for name, value in costs.items():
        if value is not None and value < 0:
            raise ValueError(f"--lora-{name}-ms must be >= 0, got {value}")
    try:
        return SimLoRA(max_loras=1 if flags.max_loras is None else flags.max_loras, max_cpu_loras=flags.max_cpu_loras,
                       **{f"{name}_s": value / 1000 for name, value in costs.items() if value is not None})
    except ValueError as exc:
        raise ValueError(f"--max-loras/--max-cpu-loras: {exc}") from None
