"""The one check of a prompt against the engine's limits, used by every door into the engine.

The front end (completions, chat, the pin route), the engine core and the scheduler all call
`check_prompt`, so a prompt one of them accepts is never refused by another. Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptLimits:
    vocab_size: int | None  # None: ids are not checked (a scheduler built without a model)
    max_model_len: int | None  # the context window: prompt + generated tokens (None: unbounded)
    max_request_tokens: int | None = None  # the most tokens one request can hold in the KV pool


class PromptError(ValueError):
    """A prompt the engine cannot take; `param` names the request field, `code` is OpenAI's."""

    def __init__(self, message: str, param: str = "prompt", code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def check_prompt(token_ids, limits: PromptLimits, max_tokens: int | None = None, param: str = "prompt") -> None:
    """Raise PromptError unless `token_ids` is a non-empty list of ids in the vocabulary that leaves
    room for at least one generated token (and for `max_tokens` of them, when given)."""
    if not token_ids:
        raise PromptError("the prompt is empty: give at least one token", param)
    vocab = limits.vocab_size
    if vocab is not None and any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
                                 for t in token_ids):
        raise PromptError(f"prompt token ids must be integers in [0, {vocab})", param)
    n = len(token_ids)
    if limits.max_model_len is not None and n >= limits.max_model_len:
        raise PromptError(f"the prompt has {n} tokens; this model's context window is {limits.max_model_len} "
                          "tokens, and must leave room for at least one generated token", param,
                          "context_length_exceeded")
    if limits.max_request_tokens is not None and n + 1 > limits.max_request_tokens:
        raise PromptError(f"the prompt has {n} tokens; the KV cache holds at most {limits.max_request_tokens} "
                          "tokens per request, and must leave room for at least one generated token", param,
                          "context_length_exceeded")
    if max_tokens is not None and limits.max_model_len is not None and n + max_tokens > limits.max_model_len:
        raise PromptError(f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) is {n + max_tokens} tokens, "
                          f"beyond this model's context window of {limits.max_model_len} tokens", "max_tokens",
                          "context_length_exceeded")


def check_logit_bias(logit_bias: dict[int, float] | None, limits: PromptLimits) -> None:
    """Raise PromptError unless every token logit_bias names is in the vocabulary (SamplingParams
    has checked the rest; only the engine knows the vocabulary's size)."""
    vocab = limits.vocab_size
    if not logit_bias or vocab is None:
        return
    bad = next((t for t in logit_bias if not 0 <= t < vocab), None)
    if bad is not None:
        raise PromptError(f"logit_bias keys must be token ids in [0, {vocab}), got {bad}", "logit_bias")
