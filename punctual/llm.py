"""The offline API, familiar to vLLM users: LLM(model, **engine_args).generate(prompts, params)."""
from __future__ import annotations

import itertools
from typing import Sequence

from punctual.engine.llm_engine import LLMEngine, PromptType
from punctual.checkpoints.generation_config import generation_defaults
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

    def get_default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's defaults, then `overrides` (fields the caller chose)."""
        return SamplingParams(**{**self.generation_defaults, **overrides})

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs in the order of the prompts."""
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

        request_ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm and len(prompts) > 1)

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
