"""What both generation routes do: validate at the edge, admit, wait, then stream or answer whole.

The endpoint-specific parts (how prompts are built, the JSON shape of choices and logprobs) are
left to CompletionServing and ChatServing.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, fields
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from punctual.engine.client import EngineDeadError
from punctual.engine.output_processor import SampleState
from punctual.lora.request import LoRARequest
from punctual.outputs import cached_prompt_tokens
from punctual.sampling_params import SamplingParams
from punctual.server.async_engine import AsyncEngine, RequestHandle, RequestRejected
from punctual.server.auth import isolation_salt
from punctual.server.config import ServerConfig
from punctual.server.errors import APIError, bad_request, from_value_error
from punctual.server.protocol import GenerationRequest
from punctual.server.structured import GrammarValidator, requested_structure
from punctual.structured.spec import StructuredOutput
from punctual.validation import PromptError, check_logit_bias, check_prompt

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client hung up before the answer was ready."""


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client hangs up first (so its request can be aborted)."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait((work_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this task itself is cancelled (shutdown): leave nothing running
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task not in done:
        raise ClientDisconnected()
    return work_task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class ChoiceCursor:
    """How much of one sample a stream has already sent."""

    num_tokens: int = 0
    text_offset: int = 0
    finish_sent: bool = False
    echoed: bool = False  # completions with echo: the prompt went out with the first chunk
    tool_parser: object | None = None  # chat with tools: a ToolCallParser over this choice's text
    num_tool_calls: int = 0


class Generation:
    """The prompts of one HTTP request (each with n samples), and one waiter for all of them."""

    def __init__(self, request_id: str, engine: AsyncEngine, handles: list[RequestHandle],
                 waiter: asyncio.Event, arrival_time: float):
        self.request_id = request_id
        self.engine = engine
        self.handles = handles
        self.waiter = waiter
        self.arrival_time = arrival_time
        self.cursors: dict[int, ChoiceCursor] = {}
        self.tool_parser_factory = None  # chat with tools: makes each choice's ToolCallParser
        self.body = None  # the request, for routes that shape their answer by its fields

    @property
    def finished(self) -> bool:
        return all(h.finished for h in self.handles)

    def raise_error(self) -> None:
        for handle in self.handles:
            if handle.error is not None:
                raise handle.error

    async def wait(self) -> None:
        """Until something changed; raises the error of a failed prompt."""
        await self.waiter.wait()
        self.waiter.clear()
        self.raise_error()

    async def wait_first(self) -> None:
        """Until every sample has its first token (or something ended), so errors can still be 4xx/5xx."""
        while not self.finished and not all(s.token_ids or s.finish_reason for s in self.samples()):
            await self.wait()
        self.raise_error()

    async def wait_finished(self) -> None:
        while not self.finished:
            await self.wait()
        self.raise_error()

    def abort(self) -> None:
        for handle in self.handles:
            self.engine.abort(handle)

    def samples(self) -> list[SampleState]:
        return [sample for handle in self.handles for sample in handle.state.samples]

    def choices(self) -> list[tuple[int, SampleState]]:
        """(choice index, sample): index = prompt index * n + sample index, as OpenAI numbers them."""
        return [(i * len(handle.state.samples) + sample.index, sample)
                for i, handle in enumerate(self.handles) for sample in handle.state.samples]

    def usage(self) -> dict:
        prompt_tokens = sum(len(h.state.prompt_token_ids) for h in self.handles)
        completion_tokens = sum(len(s.token_ids) for s in self.samples())
        # OpenAI's and vLLM's report of prompt tokens served from the prefix cache.
        cached_tokens = sum(cached_prompt_tokens(s.metrics for s in h.state.samples) or 0 for h in self.handles)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}
        # Extensions: TTFT as the engine saw it (hand-off to the core -> first token sampled), and
        # as the server saw it (HTTP arrival -> first token detokenized); the gap is the front end's.
        engine_ttfts = [h.engine_ttft for h in self.handles if h.engine_ttft is not None]
        if engine_ttfts:
            usage["engine_ttft_ms"] = round(min(engine_ttfts) * 1000, 3)
        firsts = [h.state.metrics.first_token_time for h in self.handles
                  if h.state.metrics.first_token_time is not None]
        if firsts:
            usage["server_ttft_ms"] = round((min(firsts) - self.arrival_time) * 1000, 3)
        return usage


def finite(logprob: float) -> float:
    """JSON has no -Infinity; a token the filters ruled out gets a very small number instead."""
    return logprob if logprob > -9999.0 else -9999.0


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class OpenAIServing:
    """Shared flow of a generation route; subclasses shape prompts and JSON."""

    id_prefix = "cmpl"
    chunk_object = "text_completion"  # the `object` of a streamed chunk

    def __init__(self, engine: AsyncEngine, config: ServerConfig, grammars: GrammarValidator | None = None):
        self.engine = engine
        self.config = config
        self.grammars = grammars or GrammarValidator(engine)
        self._token_text: dict[int, str] = {}

    # ---- for subclasses -----------------------------------------------------------------
    def build_prompts(self, body: GenerationRequest) -> list[tuple[str | None, list[int]]]:
        raise NotImplementedError

    def prompt_param(self) -> str:
        raise NotImplementedError

    def param_names(self, body: GenerationRequest) -> dict[str, str]:
        """SamplingParams field -> the request field a client should fix."""
        return {f.name: f.name for f in fields(SamplingParams)}

    def structured_output(self, body: GenerationRequest) -> tuple[StructuredOutput | None, str | None]:
        """The constraint on the output and the field it came from (chat adds tool calls)."""
        return requested_structure(body)

    def tool_parser_factory(self, body: GenerationRequest):
        return None

    def stream_chunks(self, generation: Generation, base: dict) -> list[dict]:
        raise NotImplementedError

    def full_response(self, generation: Generation, base: dict) -> dict:
        raise NotImplementedError

    # ---- the flow -----------------------------------------------------------------------
    def resolve_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names, None for the base model; 404 for any other name."""
        if model is None or model == self.config.served_model_name:
            return None
        lora = self.engine.loras.get(model)
        if lora is None:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}" + "".join(f", {name!r}" for name in self.engine.loras),
                           "model", "model_not_found")
        return lora

    async def create(self, body: GenerationRequest, request: Request, arrival_time: float) -> Response:
        lora = self.resolve_model(body.model)
        if not self.engine.is_alive:
            raise self.engine_error(EngineDeadError(self.engine.dead_reason or "not started"))
        try:
            params = body.sampling_params(self.engine.generation_defaults)
        except ValueError as exc:
            raise from_value_error(exc, self.param_names(body)) from None
        if params.sparse_attention and self.engine.sparse_attention is None:
            raise bad_request("sparse_attention is true, but this server attends densely (start it with "
                              "--sparse-attention quest)", "sparse_attention")
        prompts = self.build_prompts(body)
        for _, token_ids in prompts:
            self.check_prompt(token_ids, params)
        params.structured, structured_param = self.structured_output(body)
        if params.structured is not None:  # a 400 now, not a failure in the core later
            await self.grammars.check(params.structured, structured_param)
        needed = len(prompts) * params.n
        if self.engine.num_in_flight + needed > self.config.max_queue_len:
            raise APIError(429, f"the server is at capacity ({self.engine.num_in_flight} requests queued or "
                                f"running, limit {self.config.max_queue_len}); retry later",
                           code="queue_full")
        generation = self.submit(body, prompts, params, arrival_time, getattr(request.state, "tenant", None), lora)
        generation.tool_parser_factory = self.tool_parser_factory(body)
        generation.body = body
        base = {"id": f"{self.id_prefix}-{generation.request_id}", "created": int(time.time()),
                "model": self.config.served_model_name if lora is None else lora.lora_name}
        try:
            if body.stream:
                await run_until_disconnect(request, generation.wait_first())
            else:
                await run_until_disconnect(request, generation.wait_finished())
        except ClientDisconnected:
            generation.abort()
            return Response(status_code=499)  # nobody is listening; the status is for logs
        except (EngineDeadError, RequestRejected) as exc:
            generation.abort()
            raise self.engine_error(exc) from None
        except BaseException:
            generation.abort()
            raise
        if any(s.finish_reason == "rejected" for s in generation.samples()):
            generation.abort()
            raise APIError(429, "the scheduler turned this request away: its latency SLO cannot be met at the "
                                "current load; retry later", code="slo_unattainable")
        if not body.stream:
            return JSONResponse(self.full_response(generation, base))

        async def abort_if_unfinished() -> None:  # async: a sync task would run on a worker thread
            generation.abort()

        # The background task runs when the stream ends or the client hangs up.
        return StreamingResponse(self.stream(generation, base, body.include_usage), media_type="text/event-stream",
                                 background=BackgroundTask(abort_if_unfinished))

    def check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        try:
            check_prompt(token_ids, self.engine.prompt_limits, params.max_tokens, self.prompt_param())
            check_logit_bias(params.logit_bias, self.engine.prompt_limits)
        except PromptError as exc:
            raise bad_request(str(exc), exc.param, exc.code) from None

    def submit(self, body: GenerationRequest, prompts: list[tuple[str | None, list[int]]],
               params: SamplingParams, arrival_time: float, tenant: str | None = None,
               lora: LoRARequest | None = None) -> Generation:
        waiter = asyncio.Event()
        request_id = uuid.uuid4().hex
        ttft_slo = body.ttft_slo_ms if body.ttft_slo_ms is not None else self.config.ttft_slo_ms
        tpot_slo = body.tpot_slo_ms if body.tpot_slo_ms is not None else self.config.tpot_slo_ms
        cache_salt = isolation_salt(self.config.prefix_cache_isolation, tenant, body.user, body.cache_salt)
        handles: list[RequestHandle] = []
        try:
            for i, (text, token_ids) in enumerate(prompts):
                handles.append(self.engine.add_request(
                    f"{request_id}-{i}", text, token_ids, params, waiter, arrival_time=arrival_time,
                    priority=body.priority, ttft_slo_ms=ttft_slo, tpot_slo_ms=tpot_slo, user=body.user,
                    cache_salt=cache_salt, tenant=tenant, lora_request=lora))
        except (EngineDeadError, ValueError) as exc:
            for handle in handles:
                self.engine.abort(handle)
            raise self.engine_error(exc) if isinstance(exc, EngineDeadError) else from_value_error(exc) from None
        return Generation(request_id, self.engine, handles, waiter, arrival_time)

    async def stream(self, generation: Generation, base: dict, include_usage: bool) -> AsyncIterator[str]:
        try:
            while True:
                events = [sse(chunk) for chunk in self.stream_chunks(generation, base)]
                if events:
                    yield "".join(events)
                if generation.finished:
                    break
                try:
                    await generation.wait()
                except (EngineDeadError, RequestRejected) as exc:
                    yield sse(self.engine_error(exc).body()) + "data: [DONE]\n\n"
                    return
            if include_usage:
                yield sse({**base, "object": self.chunk_object, "choices": [], "usage": generation.usage()})
            yield "data: [DONE]\n\n"
        finally:
            generation.abort()

    # ---- helpers ------------------------------------------------------------------------
    def engine_error(self, exc: Exception) -> APIError:
        if isinstance(exc, EngineDeadError):
            return APIError(503, f"the engine is not running: {exc}", code="engine_unavailable")
        if isinstance(exc, RequestRejected):
            return bad_request(str(exc), self.prompt_param())
        return APIError(500, f"{type(exc).__name__}: {exc}")

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.engine.tokenizer.decode([token_id])
        return text
