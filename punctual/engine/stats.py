"""What the engine core reports about itself: counters and gauges for /metrics and the admin routes.

Pure Python: the front end imports it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    num_preemptions: int
    num_steps: int
    prompt_tokens_computed: int
    generation_tokens: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were cached
    prefix_cached_blocks: int = 0
    prefix_cache_evictions: int = 0
    prefix_cache_tier_hits: int = 0  # prompt tokens restored from the second tier
    kv_tier_blocks: int = 0  # blocks the second tier holds
    kv_tier_stored: int = 0  # blocks copied out to the tier
    kv_tier_restored: int = 0  # blocks copied back from the tier
    spec_method: str | None = None  # speculative decoding: proposer name, tokens proposed/accepted
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifications: int = 0
    # sjf: Spearman rank correlation of predicted vs actual output lengths (None: not sjf, or too few yet)
    output_length_rank_correlation: float | None = None
    # LoRA (when enabled): adapters loaded in memory, reads from disk, slot swaps, and per adapter
    # name its running requests and its waiting requests that find no free slot.
    lora_enabled: bool = False
    lora_adapters_loaded: int = 0
    lora_loads: int = 0
    lora_swaps: int = 0
    lora_running: dict[str, int] = field(default_factory=dict)
    lora_waiting_for_slot: dict[str, int] = field(default_factory=dict)
    # The adapters it holds (LoRARequest.adapter_id), in its slots or its loaded set: the router
    # sends an adapter's requests where it is already held.
    lora_adapters: list[str] = field(default_factory=list)

    @classmethod
    def merged(cls, reports: list["EngineStats"]) -> "EngineStats":
        """A cluster's totals over its replicas' reports: counters and gauges summed, per-adapter
        counts summed by name, the adapters held joined, flags true when any replica's is, and
        the rank correlation averaged over the replicas that have one."""
        total = {}
        for f in fields(cls):
            values = [getattr(s, f.name) for s in reports]
            known = [v for v in values if v is not None]
            if all(isinstance(v, bool) for v in values):
                total[f.name] = any(values)
            elif all(isinstance(v, int) for v in values):
                total[f.name] = sum(values)
            elif all(isinstance(v, dict) for v in values):
                merged: dict = {}
                for v in values:
                    for key, count in v.items():
                        merged[key] = merged.get(key, 0) + count
                total[f.name] = merged
            elif all(isinstance(v, list) for v in values):
                total[f.name] = sorted({item for v in values for item in v})
            elif known and all(isinstance(v, float) for v in known):
                total[f.name] = sum(known) / len(known)
            else:  # a name every replica shares (the speculative method)
                total[f.name] = known[0] if known else None
        return cls(**total)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used
