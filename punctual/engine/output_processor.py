"""Front-end side of a request: core token outputs -> text, stop strings, logprobs, n samples.

Used in-process by the offline engine and in the server's front-end process alike. A stop
string ends a sample here, so the caller must abort that request in the core.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from punctual.outputs import CompletionOutput, RequestMetrics, RequestOutput
from punctual.request import EngineCoreOutput, TokenLogprobs
from punctual.sampling_params import SamplingParams
from punctual.tokenizer import IncrementalDetokenizer


@dataclass
class SampleState:
    """One of a request's n samples (one core request)."""

    parent_id: str
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    emitted_chars: int = 0  # how much of `text` has been released to a stream
    first_token_time: float | None = None
    metrics: dict | None = None  # the core's final latency record

    @property
    def releasable_text(self) -> str:
        """Text safe to stream: hold back what could still be the start of a stop string."""
        if self.finish_reason is not None or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[:max(len(self.text) - hold, self.emitted_chars)]

    def take_delta(self) -> str:
        text = self.releasable_text
        delta = text[self.emitted_chars:]
        self.emitted_chars = len(text)
        return delta


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    metrics: RequestMetrics
    # prompt_logprobs, as the first sample's core request scored them (every sample scores the same prompt).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def to_output(self) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, list(s.token_ids), s.finish_reason,
                                 list(s.logprobs) if s.logprobs is not None else None, s.metrics)
                for s in self.samples]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.metrics,
                             list(self.prompt_logprobs) if self.prompt_logprobs is not None else None)


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.children: dict[str, SampleState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[tuple[str, SamplingParams]]:
        """Track a request; returns the (core request id, params) of each of its n samples."""
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        samples, children = [], []
        for index in range(params.n):
            child_params = params.for_child(index)
            child_id = child_request_id(request_id, index, params.n)
            state = SampleState(request_id, index, child_params,
                                IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                       params.skip_special_tokens),
                                logprobs=[] if params.logprobs is not None else None)
            samples.append(state)
            self.children[child_id] = state
            children.append((child_id, child_params))
        self.parents[request_id] = ParentState(request_id, prompt, list(prompt_token_ids), samples,
                                               RequestMetrics(arrival_time),
                                               [] if params.prompt_logprobs is not None else None)
        return children

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        if parent is None:
            return []
        n = len(parent.samples)
        return [child_request_id(request_id, s.index, n) for s in parent.samples if s.finish_reason is None]

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[ParentState], list[str]]:
        """Apply core outputs; returns the parents that changed and core ids to abort (stop strings)."""
        changed: dict[str, ParentState] = {}
        to_abort: list[str] = []
        now = time.monotonic()
        for out in core_outputs:
            sample = self.children.get(out.request_id)
            if sample is None or sample.finish_reason is not None:
                continue  # aborted or stopped already; a late output of the core
            parent = self.parents[sample.parent_id]
            if out.prompt_logprobs and sample.index == 0 and parent.prompt_logprobs is not None:
                parent.prompt_logprobs.extend(out.prompt_logprobs)
                changed[parent.request_id] = parent
            if sample.first_token_time is None and out.new_token_ids:
                sample.first_token_time = now
                if parent.metrics.first_token_time is None:
                    parent.metrics.first_token_time = now
            sample.token_ids.extend(out.new_token_ids)
            if out.metrics is not None:
                sample.metrics = out.metrics
            if out.new_logprobs and sample.logprobs is not None:
                sample.logprobs.extend(out.new_logprobs)
            delta = sample.detokenizer.add(out.new_token_ids)
            stop_at = self._find_stop(sample, delta) if delta and sample.params.stop else None
            sample.text += delta
            if stop_at is not None:
                sample.text = sample.text[:stop_at]
                sample.finish_reason = "stop"
                if out.finish_reason is None:
                    to_abort.append(out.request_id)
            elif out.finish_reason is not None:
                sample.finish_reason = out.finish_reason
            if sample.finish_reason is not None:
                del self.children[out.request_id]
            changed[parent.request_id] = parent
        for parent in changed.values():
            if parent.finished:
                parent.metrics.finished_time = now
                del self.parents[parent.request_id]
        return list(changed.values()), to_abort

    @staticmethod
    def _find_stop(sample: SampleState, delta: str) -> int | None:
        """Where the text should end if a stop string completes within the new delta."""
        longest = max(len(s) for s in sample.params.stop)
        base = max(0, len(sample.text) - longest + 1)
        window = (sample.text + delta)[base:]
        hits = [(window.find(s), s) for s in sample.params.stop if window.find(s) != -1]
        if not hits:
            return None
        pos, stop = min(hits)
        end = base + pos
        return end + len(stop) if sample.params.include_stop_str_in_output else end

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the core ids still to abort."""
        ids = self.child_ids(request_id)
        parent = self.parents.pop(request_id, None)
        if parent is not None:
            for sample in parent.samples:
                if sample.finish_reason is None:
                    sample.finish_reason = "abort"
        for child_id in ids:
            self.children.pop(child_id, None)
        return ids
