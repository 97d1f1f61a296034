"""LoRA adapters in the simulator: which adapter each request runs under, and what bringing one
in costs a replica's step.

The slots are the shipped scheduler's own (`Scheduler(max_loras=...)`: admission by slot, LRU
hand-over); the loaded set is the runner's policy (`punctual.lora.cache.AdapterCache`, LRU of
`max_cpu_loras`) with no weights in it. A step that takes an adapter into a slot pays `swap_s`,
plus `load_s` when the adapter had to be read from disk; every step pays `group_s` per distinct
adapter among its rows (the shrink/expand of each group in every adapted linear).

The default costs are ESTIMATES, not measurements (a rank-16 adapter of a ~135M-parameter model
on CPU: ~20 ms to read its safetensors, ~1 ms to copy it into a slot, ~1 ms of low-rank terms per
group and step); `benchmarks/bench_lora.py` measures the load and the per-group step time on the
machine at hand: pass them with `--lora-load-ms` / `--lora-swap-ms` / `--lora-group-ms`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from punctual.lora.cache import AdapterCache
from punctual.lora.request import LoRARequest, adapter_id_of


@dataclass(frozen=True)
class SimLoRA:
    max_loras: int = 1  # adapters in one step (the scheduler's slots), as --max-loras
    max_cpu_loras: int | None = None  # adapters kept loaded (LRU), as --max-cpu-loras; None: max_loras
    load_s: float = 0.020  # read one adapter from disk (estimate; see the module docstring)
    swap_s: float = 0.001  # copy a loaded adapter into a slot (estimate)
    group_s: float = 0.001  # each distinct adapter's low-rank terms in one step (estimate)

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        for name in ("load_s", "swap_s", "group_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"lora {name} must be >= 0, got {getattr(self, name)}")


def sim_adapter(index: int) -> LoRARequest:
    """The simulator's adapter number `index` (0-based) as a request names it (no file behind it)."""
    return LoRARequest(f"adapter-{index}", index + 1, f"sim://adapter-{index}")


def zipf_adapters(count: int, num_adapters: int, exponent: float = 1.0, seed: int = 0) -> list[int]:
    """`count` adapter indexes drawn with Zipf popularity (adapter k with weight 1 / (k+1)^exponent)."""
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if exponent < 0:
        raise ValueError(f"adapter Zipf exponent must be >= 0, got {exponent}")
    weights = [1.0 / (k + 1) ** exponent for k in range(num_adapters)]
    return random.Random(seed).choices(range(num_adapters), weights, k=count)


class AdapterSlots:
    """One replica's loaded set, and the price of the adapters a step brings into its slots."""

    def __init__(self, lora: SimLoRA):
        self.lora = lora
        self.loaded: AdapterCache[bool] = AdapterCache(lora.max_cpu_loras or lora.max_loras, lambda _: True)
        self.num_swaps_in = 0  # adapters taken into a slot they did not hold
        self.num_disk_loads = 0

    def step_cost(self, slotted_before: list[int], slotted_after: list[int], step_adapters: dict[int, LoRARequest]) -> float:
        """Seconds a step adds: each adapter newly in a slot (swap, and a disk read when not
        loaded), and the low-rank terms of each adapter group among its rows."""
        seconds = self.lora.group_s * len(step_adapters)
        before = set(slotted_before)
        for adapter in slotted_after:
            if adapter in before:
                continue
            request = step_adapters.get(adapter)
            self.num_swaps_in += 1
            seconds += self.lora.swap_s
            if adapter not in self.loaded:
                self.num_disk_loads += 1
                seconds += self.lora.load_s
            if request is not None:
                self.loaded.get(request)  # touched (or loaded): the LRU order follows use
        for request in step_adapters.values():
            self.loaded.get(request)
        return seconds

    def held(self, slots: list[int]) -> frozenset[str]:
        """The adapters the replica holds (loaded or in a slot), as it reports them to the router."""
        return frozenset(adapter_id_of(i) for i in (*self.loaded.adapters, *slots))
