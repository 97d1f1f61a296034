"""The loaded adapters: an LRU of at most `max_cpu_loras`, keyed by lora_int_id (S-LoRA's host copy).

An adapter evicted here while requests still run under it is read from disk again when a step
needs it: correct, only slower. Loading reads safetensors on the caller's thread (the core's step
loop, between steps): a rank-16 adapter of a small model is a few MB.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from punctual.lora.request import LoRARequest
from punctual.lora.weights import LoRAAdapter


class AdapterCache:
    def __init__(self, capacity: int, load: Callable[[LoRARequest], LoRAAdapter]):
        self.capacity = capacity
        self._load = load
        self.adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.num_loads = 0  # reads from disk
        self.num_evictions = 0

    def get(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter's weights, read (and checked) if not loaded; ValueError naming a problem,
        with nothing already loaded disturbed."""
        adapter = self.adapters.get(request.lora_int_id)
        if adapter is not None:
            if adapter.request.lora_path != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} is loaded from {adapter.request.lora_path!r}, "
                                 f"not {request.lora_path!r}: give each adapter its own lora_int_id")
            self.adapters.move_to_end(request.lora_int_id)
            return adapter
        adapter = self._load(request)  # raises before anything is evicted
        self.num_loads += 1
        self.adapters[request.lora_int_id] = adapter
        while len(self.adapters) > self.capacity:
            self.adapters.popitem(last=False)
            self.num_evictions += 1
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        return self.adapters.pop(lora_int_id, None) is not None

    def __len__(self) -> int:
        return len(self.adapters)
