"""What the model runner keeps per request across steps, built and updated from the step plans.

The runner reads no live `Request`: a request's block table, sampling parameters and penalty
history arrive with its first plan after admission (`NewRequestData`) and grow from later plans
and from the tokens the runner itself samples.
"""
from __future__ import annotations

import torch

from punctual.sampling_params import SamplingParams


class RequestState:
    def __init__(self, request_id: str, sampling_params: SamplingParams, block_ids: list[int],
                 prompt_token_ids: tuple[int, ...], output_token_ids: tuple[int, ...], vocab_size: int = 0,
                 device: torch.device | str = "cpu"):
        self.request_id = request_id
        self.sampling_params = sampling_params
        # Kept only to score the prompt (prompt_logprobs): the token each position predicts.
        self.prompt_token_ids = prompt_token_ids if sampling_params.prompt_logprobs is not None else None
        self.block_ids = block_ids
        # The table as a tensor too, grown with it, so building a step's padded tables is one C call.
        self.blocks = torch.tensor(block_ids, dtype=torch.long)
        # Penalty history, only for requests that use penalties: which tokens were seen (prompt and
        # output, transformers' repetition penalty) and how often each was generated (OpenAI's),
        # as vocabulary-wide tensors updated in place, so a step's cost does not grow with the context.
        self.seen: torch.Tensor | None = None  # [vocab] bool
        self.output_counts: torch.Tensor | None = None  # [vocab] float32
        # logit_bias as two tensors built once, so a step scatters them without a Python loop over tokens.
        self.bias_token_ids: torch.Tensor | None = None  # [B] long
        self.bias_values: torch.Tensor | None = None  # [B] float32
        if sampling_params.logit_bias:
            self.bias_token_ids = torch.tensor(list(sampling_params.logit_bias), dtype=torch.long, device=device)
            self.bias_values = torch.tensor(list(sampling_params.logit_bias.values()), dtype=torch.float32,
                                            device=device)
        if sampling_params.needs_penalties:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_token_ids, dtype=torch.long, device=device)] = True
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.add_output(output_token_ids)

    def add_blocks(self, block_ids: tuple[int, ...]) -> None:
        if block_ids:
            self.block_ids.extend(block_ids)
            self.blocks = torch.cat([self.blocks, torch.tensor(block_ids, dtype=torch.long)])

    def add_output(self, token_ids) -> None:
        """Record generated tokens (the penalty history; nothing to keep without penalties)."""
        if self.seen is None or not token_ids:
            return
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.seen.device)
        self.seen[ids] = True
        self.output_counts.index_add_(0, ids, torch.ones(len(ids), device=self.seen.device))
