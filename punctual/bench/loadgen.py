"""The load generator: streams completions from an OpenAI-compatible endpoint and times every token.

Each request is a POST to /v1/completions with `stream: true`; the SSE body is decoded here
from raw bytes (bench/sse.py) and each event is stamped when its bytes arrive, so the times
are what a client sees, with no library buffering between.

What is recorded, per request (all times in seconds from when it was sent):
- TTFT: the first chunk whose text is not empty. llama.cpp's server sends an empty chunk
  before prefill is done; counting it would flatter its TTFT.
- token times: every chunk with text. A chunk that carries several tokens (a detokenizer that
  held back a partial character) counts once, so inter-token latencies are per chunk.
- output tokens: the usage block's completion_tokens when the server sends one, else chunks.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

from punctual.bench.sse import SSEDecoder
from punctual.bench.workloads import BenchRequest

STYLES = ("openai", "llama.cpp")


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests and how to phrase them for that server."""

    base_url: str                # e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str | None = None     # None: the first model the server lists at /v1/models
    api_key: str | None = None
    # "openai": max_tokens + ignore_eos (vLLM, Punctual); "llama.cpp": also n_predict, its own name.
    style: str = "openai"
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style: unknown {self.style!r}; choose from {', '.join(STYLES)}")

    @property
    def api_url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, request: BenchRequest, model: str | None) -> dict:
        # skip_special_tokens false (a vLLM extension; others ignore it): every token is timed
        # as it arrives, even one a random-weight model draws from the special tokens.
        body = {"prompt": request.prompt, "max_tokens": request.output_len, "ignore_eos": True,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                "skip_special_tokens": False}
        if model is not None:
            body["model"] = model
        if request.user is not None:
            body["user"] = request.user
        if self.style == "llama.cpp":
            body["n_predict"] = request.output_len
        return {**body, **self.extra_body}


@dataclass
class RequestRecord:
    """What happened to one request, as the client saw it."""

    index: int
    prompt_len: int                  # intended prompt tokens
    output_len: int                  # tokens asked for
    user: str | None = None
    scheduled_s: float = 0.0         # when it was due, from the start of the run
    sent_s: float = 0.0              # when it was sent, from the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # each chunk with text, from sending
    prompt_tokens: int | None = None  # from the server's usage block
    usage_output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return self.usage_output_tokens if self.usage_output_tokens is not None else len(self.token_times_s)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - TTFT) / (output tokens - 1)."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive chunks with text."""
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]

    def to_json(self) -> dict:
        return {"index": self.index, "user": self.user, "prompt_len": self.prompt_len,
                "output_len": self.output_len, "scheduled_s": self.scheduled_s, "sent_s": self.sent_s,
                "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "finish_reason": self.finish_reason, "error": self.error, "token_times_s": self.token_times_s}


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration_s: float  # from the first send to the last answer


def apply_event(record: RequestRecord, data: str, elapsed_s: float) -> None:
    """Fold one SSE event (its data) into the record."""
    if data.strip() == "[DONE]":
        return
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        record.error = f"bad event: {data[:200]!r}"
        return
    if "error" in event:
        error = event["error"]
        record.error = str(error.get("message", error) if isinstance(error, dict) else error)
        return
    for choice in event.get("choices") or []:
        if choice.get("text"):
            record.token_times_s.append(elapsed_s)
            if record.ttft_s is None:
                record.ttft_s = elapsed_s
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.usage_output_tokens = usage.get("completion_tokens", record.usage_output_tokens)


async def send_request(client: httpx.AsyncClient, endpoint: Endpoint, model: str | None,
                       request: BenchRequest, record: RequestRecord) -> None:
    """Send one request and stream its answer into `record`."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", endpoint.api_url + "/completions", json=endpoint.body(request, model),
                                 headers=endpoint.headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:300]}"
                return
            decoder = SSEDecoder()
            async for chunk in response.aiter_bytes():
                elapsed = time.perf_counter() - start
                for data in decoder.feed(chunk):
                    apply_event(record, data, elapsed)
            for data in decoder.close():
                apply_event(record, data, time.perf_counter() - start)
        record.e2e_s = time.perf_counter() - start
        if record.ok and not record.token_times_s:
            if record.finish_reason is not None and (record.usage_output_tokens or 0) > 0:
                # Tokens were generated but none decoded to visible text (special tokens, or
                # bytes of an unfinished character): the user saw the answer only at the end.
                record.token_times_s.append(record.e2e_s)
                record.ttft_s = record.e2e_s
            else:
                record.error = "the stream carried no tokens"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"


async def resolve_model(client: httpx.AsyncClient, endpoint: Endpoint) -> str | None:
    """The model to name in requests: the endpoint's, else the first the server lists, else none."""
    if endpoint.model is not None:
        return endpoint.model
    try:
        response = await client.get(endpoint.api_url + "/models", headers=endpoint.headers)
        models = response.json().get("data") or []
        return models[0]["id"] if models else None
    except (httpx.HTTPError, ValueError, KeyError, AttributeError):
        return None


def make_client(endpoint: Endpoint, timeout_s: float,
                transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    host = urlparse(endpoint.base_url).hostname or ""
    loopback = host in ("localhost", "127.0.0.1", "::1")
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), transport=transport,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                             trust_env=not loopback)  # no proxy between us and a local server


async def run_requests(endpoint: Endpoint, requests: list[BenchRequest], *, offsets: list[float] | None = None,
                       concurrency: int | None = None, progress: bool = True, desc: str | None = None,
                       timeout_s: float = 600.0, transport: httpx.AsyncBaseTransport | None = None) -> LoadResult:
    """Send `requests` open loop at `offsets` (seconds from start; else each request's
    arrival_s), or closed loop with `concurrency` clients; wait for every answer.
    `transport` replaces the network (tests)."""
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
    elif offsets is None:
        offsets = [r.arrival_s for r in requests]
        if any(o is None for o in offsets):
            raise ValueError("give offsets, concurrency, or requests with arrival times (a trace)")
    elif len(offsets) != len(requests):
        raise ValueError(f"offsets: {len(offsets)} for {len(requests)} requests")
    records = [RequestRecord(i, r.prompt_len, r.output_len, r.user) for i, r in enumerate(requests)]
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
    async with make_client(endpoint, timeout_s, transport) as client:
        model = await resolve_model(client, endpoint)
        start = time.perf_counter()

        async def one(i: int) -> None:
            records[i].sent_s = time.perf_counter() - start
            await send_request(client, endpoint, model, requests[i], records[i])
            bar.update(1)

        if concurrency is not None:
            pending = iter(range(len(requests)))

            async def client_loop() -> None:
                for i in pending:  # the iterator is shared: each index goes to one client
                    records[i].scheduled_s = time.perf_counter() - start
                    await one(i)

            await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(requests)))))
        else:
            async def scheduled(i: int) -> None:
                records[i].scheduled_s = offsets[i]
                await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
                await one(i)

            await asyncio.gather(*(scheduled(i) for i in range(len(requests))))
        duration = time.perf_counter() - start
    bar.close()
    return LoadResult(records, duration)


def run(endpoint: Endpoint, requests: list[BenchRequest], **kwargs) -> LoadResult:
    """`run_requests` for callers without an event loop."""
    return asyncio.run(run_requests(endpoint, requests, **kwargs))
