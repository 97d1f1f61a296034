"""Which adapter a request runs under: vLLM's LoRARequest, plain data (no torch)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) at `lora_path`.

    `lora_int_id` is its identity, as in vLLM: requests with the same id run the same weights and
    share prefix-cache blocks; requests of different ids (or none) never do."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be a non-empty string, got {self.lora_path!r}")

    @property
    def adapter_id(self) -> str:
        """The adapter's part of the prefix cache's root hash (and its name to the router)."""
        return adapter_id_of(self.lora_int_id)


def adapter_id_of(lora_int_id: int) -> str:
    return f"lora:{lora_int_id}"
