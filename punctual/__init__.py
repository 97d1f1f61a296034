"""Punctual: a latency-first LLM serving engine.

`LLM` is imported lazily, so pure-Python parts (the scheduler, the simulator) load without torch.
"""
from punctual.lora.request import LoRARequest
from punctual.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from punctual.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from punctual import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'punctual' has no attribute {name!r}")
