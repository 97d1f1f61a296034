"""LoRA adapters served beside their base model: the request naming one (pure Python), the PEFT
checkpoint reader, the batched low-rank terms and the LRU of loaded adapters (torch)."""
from punctual.lora.request import LoRARequest

__all__ = ["LoRARequest"]
