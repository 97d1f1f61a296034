"""The loaded adapters: an LRU of at most `max_cpu_loras`, keyed by lora_int_id (S-LoRA's host copy).

An adapter evicted here while requests still run under it is read from disk again when a step
needs it: correct, only slower. Pure Python (the weights are whatever `load` returns), so the
simulator keeps the same policy with no weights at all.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

from punctual.lora.request import LoRARequest

Adapter = TypeVar("Adapter")


class AdapterCache(Generic[Adapter]):
    def __init__(self, capacity: int, load: Callable[[LoRARequest], Adapter]):
        self.capacity = capacity
        self._load = load
        self.adapters: OrderedDict[int, Adapter] = OrderedDict()
        self._paths: dict[int, str] = {}  # lora_int_id -> the path it was read from
        self.num_loads = 0  # reads from disk
        self.num_evictions = 0

    def __contains__(self, lora_int_id: int) -> bool:
        return lora_int_id in self.adapters

    def get(self, request: LoRARequest) -> Adapter:
        """The adapter's weights, read (and checked) if not loaded; ValueError naming a problem,
        with nothing already loaded disturbed."""
        adapter = self.adapters.get(request.lora_int_id)
        if adapter is not None:
            self.check_path(request)
            self.adapters.move_to_end(request.lora_int_id)
            return adapter
        return self.put(request, self._load(request))  # raises before anything is evicted

    def check_path(self, request: LoRARequest) -> None:
        path = self._paths.get(request.lora_int_id)
        if path is not None and path != request.lora_path:
            raise ValueError(f"lora_int_id {request.lora_int_id} is loaded from {path!r}, "
                             f"not {request.lora_path!r}: give each adapter its own lora_int_id")

    def put(self, request: LoRARequest, adapter: Adapter) -> Adapter:
        """Keep an adapter read elsewhere (a background thread), evicting the least recently used."""
        self.num_loads += 1
        self.adapters[request.lora_int_id] = adapter
        self.adapters.move_to_end(request.lora_int_id)
        self._paths[request.lora_int_id] = request.lora_path
        while len(self.adapters) > self.capacity:
            evicted, _ = self.adapters.popitem(last=False)
            del self._paths[evicted]
            self.num_evictions += 1
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        self._paths.pop(lora_int_id, None)
        return self.adapters.pop(lora_int_id, None) is not None

    def __len__(self) -> int:
        return len(self.adapters)
