"""The offline API, familiar to vLLM users: LLM(model, **engine_args).generate(prompts, params)."""
from __future__ import annotations

import itertools
from typing import Sequence

from punctual.engine.llm_engine import LLMEngine, PromptType
from punctual.chat_template import apply_chat_template
from punctual.checkpoints.generation_config import generation_defaults
from punctual.lora.request import LoRARequest
from punctual.outputs import RequestOutput
from punctual.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "builtin", **engine_args):
        """`engine_args`: EngineConfig.from_kwargs keywords (config.py's fields; the CLI's engine
        flags are punctual/engine_args.py's, each named as its keyword). An unknown one raises."""
        self.engine = LLMEngine.from_kwargs(model, **engine_args)
        self._ids = itertools.count()
        # The checkpoint's sampling defaults (generation_config.json), as vLLM applies them.
        self.generation_defaults = generation_defaults(self.engine.core.runner.model_path)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's defaults, then `overrides` (fields the caller chose)."""
        return SamplingParams(**{**self.generation_defaults, **overrides})

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs in the order of the prompts.
        `lora_request`: one adapter for every prompt, or one (or None) per prompt."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_requests = [lora_request] * len(prompts)
        else:
            lora_requests = list(lora_request)
            if len(lora_requests) != len(prompts):
                raise ValueError(f"got {len(lora_requests)} lora_request for {len(prompts)} prompts")

        request_ids = []
        try:
            for prompt, params, lora in zip(prompts, sampling_params, lora_requests):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, params, lora_request=lora)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm and len(prompts) > 1)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or to a list
        of them, each through the tokenizer's chat template as the server applies it."""
        messages = list(messages)
        conversations = [messages] if messages and isinstance(messages[0], dict) else [list(c) for c in messages]
        prompts = []
        for conversation in conversations:
            _, token_ids = apply_chat_template(self.get_tokenizer(), conversation, add_generation_prompt)
            prompts.append({"prompt_token_ids": token_ids})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, request_ids: list[str], show_progress: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(request_ids), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if progress is not None:
                            progress.update(1)
        finally:
            if progress is not None:
                progress.close()
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
        return [finished[request_id] for request_id in request_ids]
