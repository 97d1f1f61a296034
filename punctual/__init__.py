"""Punctual: a latency-first LLM serving engine."""
from punctual.llm import LLM
from punctual.outputs import CompletionOutput, RequestOutput
from punctual.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
