"""The state one request carries through the engine core, and the messages at its boundary.

Pure Python (no torch): the scheduler, the simulator and the front end all import it.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from punctual.lora.request import LoRARequest
from punctual.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_REJECTED = "rejected"  # turned away by the scheduler (cannot meet its SLO)
    MIGRATED = "migrated"  # moved to another engine, which goes on with it

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "rejected", "migrated")


@dataclass
class EngineCoreRequest:
    """What the front end sends the core: tokens in, no text."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower value is served first, as in vLLM
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    user: str | None = None
    # Prefix-cache isolation (vLLM's cache_salt): only requests with the same salt share cached
    # blocks. None or "": shared with every request that has none.
    cache_salt: str | None = None
    # Who pays for the request (the API key's tenant): the fair-share policy's unit when set.
    tenant: str | None = None
    # The LoRA adapter to run under (None: the base model).
    lora_request: LoRARequest | None = None


@dataclass
class MigratedRequest:
    """A running request as it leaves one engine for another: what it asked for, what it has
    generated, and how many of its tokens the KV that travels with it covers."""

    core_request: EngineCoreRequest
    output_token_ids: list[int]
    num_computed_tokens: int
    num_preemptions: int = 0
    num_evicted_tokens: int = 0  # attention sinks: tokens the KV no longer holds (after the sinks)
    # When its first token was made (the source's clock, as arrival_time is the front end's): the
    # target goes on from a request that has one, and reports no first token of its own.
    first_token_time: float | None = None


@dataclass
class TokenLogprobs:
    """Logprob of a sampled token and the top-k alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class EngineCoreOutput:
    """What the core sends back per request per step: new tokens, and why it ended."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    new_logprobs: list[TokenLogprobs] | None = None
    # Logprobs of prompt tokens computed in this step, in order (None for the first token), for
    # requests that asked for prompt_logprobs.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # On the output that carries the first token only: the core's clock when it was sampled.
    first_token_time: float | None = None
    # With the final output only: queue time, TTFT, TPOT (ms) and whether each SLO was met.
    metrics: dict | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    """A request inside the core: prompt, generated tokens and how many of them the KV cache holds.

    One scheduling idea covers prefill and decode: the request wants `num_tokens` tokens in the
    KV cache and has `num_computed_tokens`; the scheduler closes the gap in chunks.
    """

    # Slotted: every step reads a few fields of every running request, and a simulated cluster
    # holds a hundred thousand of them; fixed offsets keep those reads to a cache line or two.
    __slots__ = ("request_id", "prompt_token_ids", "token_ids", "num_output_tokens", "num_prompt_logprobs_sent",
                 "sampling_params", "arrival_time", "priority", "ttft_slo_ms", "tpot_slo_ms", "user", "cache_salt",
                 "tenant", "lora_request", "status", "num_computed_tokens", "num_cached_tokens", "num_preemptions", "grammar", "best_effort",
                 "first_scheduled_time", "first_token_time", "finished_time", "max_output_tokens", "_stop_ids",
                 "num_evicted_tokens", "shareable_blocks")

    def __init__(self, core_request: EngineCoreRequest, max_model_len: int):
        params = core_request.sampling_params
        self.request_id = core_request.request_id
        self.prompt_token_ids: tuple[int, ...] = tuple(core_request.prompt_token_ids)
        # Prompt then generated tokens, appended in place: per-step readers (prompt lookup, block
        # hashing) index it instead of rebuilding a list that grows with the context.
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.num_output_tokens = 0
        self.num_prompt_logprobs_sent = 0  # prompt positions whose logprobs went out (not again after a preemption)
        self.sampling_params = params
        self.arrival_time = core_request.arrival_time
        self.priority = core_request.priority
        self.ttft_slo_ms = core_request.ttft_slo_ms
        self.tpot_slo_ms = core_request.tpot_slo_ms
        self.user = core_request.user
        self.cache_salt = core_request.cache_salt or None
        self.tenant = core_request.tenant
        self.lora_request = core_request.lora_request
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.num_preemptions = 0
        self.grammar = None  # structured output: the compiled matcher, handed to the runner in the plan
        self.best_effort = False  # demoted by the slo policy: served after every request with an SLO
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # Generation stops at max_tokens or at the context window, whichever comes first.
        room = max_model_len - len(self.prompt_token_ids)
        self.max_output_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        # Attention sinks: tokens dropped from the KV cache after the sink blocks (whole blocks), and
        # how many leading blocks may be shared through the prefix cache (None: all of them; a
        # request whose window will move shares only its sinks, as its window keys are re-rotated).
        self.num_evicted_tokens = 0
        self.shareable_blocks: int | None = None
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids.update(params.eos_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def adapter(self) -> int | None:
        """The LoRA adapter's id (lora_int_id), None for the base model."""
        return None if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the generated tokens (O(output): not for per-step use)."""
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_prefilling(self) -> bool:
        """True while more than the next decode token is missing from the KV cache."""
        return self.num_tokens - self.num_computed_tokens > 1

    def append_token(self, token_id: int) -> str | None:
        """Record a sampled token; returns the finish reason if this token ends the request."""
        self.token_ids.append(token_id)
        self.num_output_tokens += 1
        n_out = self.num_output_tokens
        if token_id in self._stop_ids and n_out >= self.sampling_params.min_tokens:
            return RequestStatus.FINISHED_STOPPED.value
        if n_out >= self.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH.value
        return None

    def tokens_before_finish(self, token_id: int) -> int:
        """How many more `token_id`s append_token would take before one ends the request (the
        simulator's synthetic tokens: it repeats decode steps that end nobody)."""
        room = self.max_output_tokens - self.num_output_tokens - 1
        if token_id in self._stop_ids:
            room = min(room, self.sampling_params.min_tokens - self.num_output_tokens - 1)
        return max(0, room)

    def extend_tokens(self, token_id: int, count: int) -> None:
        """append_token `count` times, for a caller that checked tokens_before_finish >= count."""
        self.token_ids.extend([token_id] * count)
        self.num_output_tokens += count

    def latency_metrics(self) -> dict:
        """Per-request latency record (ms) and SLO attainment, for the final output."""
        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else (b - a) * 1000.0

        ttft = ms(self.arrival_time, self.first_token_time)
        tpot = None
        if self.num_output_tokens > 1 and self.finished_time is not None and self.first_token_time is not None:
            tpot = ms(self.first_token_time, self.finished_time) / (self.num_output_tokens - 1)
        return {
            "queue_time_ms": ms(self.arrival_time, self.first_scheduled_time),
            "ttft_ms": ttft, "tpot_ms": tpot, "num_preemptions": self.num_preemptions,
            "num_cached_tokens": self.num_cached_tokens,
            "ttft_slo_met": None if self.ttft_slo_ms is None or ttft is None else ttft <= self.ttft_slo_ms,
            "tpot_slo_met": None if self.tpot_slo_ms is None else (tpot is None or tpot <= self.tpot_slo_ms),
        }

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")
