"""What the offline API returns: per request, one CompletionOutput per sample."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from punctual.request import TokenLogprobs


def cached_prompt_tokens(sample_metrics: Iterable[dict | None]) -> int | None:
    """Prompt tokens a request found in the prefix cache, from its samples' final records; None
    until one has finished. With n > 1, the fewest any sample found (a later sample may find its
    siblings' blocks), so the count never exceeds what the prompt reused from before it."""
    counts = [m["num_cached_tokens"] for m in sample_metrics if m is not None]
    return min(counts) if counts else None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None = None
    # Final latency record from the core: queue_time_ms, ttft_ms, tpot_ms, SLO met flags.
    metrics: dict | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    # With prompt_logprobs: per prompt token, its logprob and top alternatives (None for the first).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    @property
    def num_cached_tokens(self) -> int | None:
        """Prompt tokens found in the prefix cache (vLLM's field); None until a sample finishes."""
        return cached_prompt_tokens(o.metrics for o in self.outputs)
