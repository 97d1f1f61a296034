"""The in-process engine: tokenizer + output processor around an EngineCore (the offline API's base)."""
from __future__ import annotations

import time
from typing import Any

from punctual.config import EngineConfig
from punctual.engine.core import EngineCore
from punctual.engine.stats import EngineStats
from punctual.engine.output_processor import OutputProcessor
from punctual.lora.request import LoRARequest
from punctual.outputs import RequestOutput
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from punctual.tokenizer import load_tokenizer

PromptType = str | dict[str, Any] | list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = load_tokenizer(self.core.runner.model_path)
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_kwargs(cls, model: str = "builtin", **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, *,
                    priority: int = 0, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None,
                    user: str | None = None, arrival_time: float | None = None,
                    cache_salt: str | None = None, lora_request: LoRARequest | None = None) -> None:
        """Queue a prompt. A prompt dict may carry `cache_salt` (vLLM's shape), as may the keyword:
        only requests with the same salt share prefix-cache blocks. `lora_request`: the adapter to
        run under (None: the base model)."""
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        params = params or SamplingParams()
        if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
            if cache_salt is not None and cache_salt != prompt["cache_salt"]:
                raise ValueError("cache_salt is given both in the prompt dict and as a keyword, differently")
            cache_salt = prompt["cache_salt"]
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        text, token_ids = self.tokenize_prompt(prompt)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        children = self.output_processor.add_request(request_id, text, token_ids, params, arrival_time)
        added = []
        try:
            for child_id, child_params in children:
                self.core.add_request(EngineCoreRequest(child_id, token_ids, child_params, arrival_time,
                                                        priority, ttft_slo_ms, tpot_slo_ms, user, cache_salt,
                                                        lora_request=lora_request))
                added.append(child_id)
        except Exception:
            self.core.abort_requests(added)
            self.output_processor.abort(request_id)
            raise

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort(request_id))

    def step(self) -> list[RequestOutput]:
        changed, to_abort = self.output_processor.process(self.core.step())
        if to_abort:
            self.core.abort_requests(to_abort)
        return [parent.to_output() for parent in changed]

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return self.core.stats()
