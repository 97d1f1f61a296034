"""A static-batching transformers server: the floor that continuous batching is measured against.

Requests wait in a queue. When the model is free, the worker takes the first waiting request,
waits `--batch-wait-ms` for others to gather, takes up to `--max-batch-size` of them, pads
them on the left into one batch and runs `generate` until every one of them is done. A request
that arrives meanwhile waits for the whole batch, however short its own answer: that
head-of-line blocking is what iteration-level scheduling (Orca, OSDI'22) removes.

Only what the benchmark needs of the OpenAI API: POST /v1/completions (text prompt,
max_tokens, ignore_eos, stream, stream_options.include_usage), GET /v1/models, GET /health.
Decoding is greedy (one batch shares one `generate` call, so per-request sampling settings
cannot differ).

    python -m punctual.bench.hf_server builtin --port 8001 --max-batch-size 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers.generation.streamers import BaseStreamer

_DONE = object()  # the end-of-stream marker on a job's queue


@dataclass
class Job:
    """One request in the worker's hands; the worker thread feeds `events` on the server's loop."""

    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # incremental detokenization: text up to read_offset has been sent; prefix_offset gives context
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def usage(self) -> dict:
        prompt, completion = len(self.prompt_ids), len(self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class BatchStreamer(BaseStreamer):
    """Receives each step's tokens for the whole batch from `generate` and hands them to the jobs."""

    def __init__(self, jobs: list[Job], tokenizer, eos_token_id: int | None):
        self.jobs, self.tokenizer, self.eos_token_id = jobs, tokenizer, eos_token_id
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate's first call passes the prompts
            self.seen_prompt = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            if token == self.eos_token_id and not job.ignore_eos:
                self.finish(job, "stop")
                continue
            job.token_ids.append(token)
            text = self.new_text(job)
            if text:
                job.send(text)
            if len(job.token_ids) >= job.max_tokens:
                self.finish(job, "length")

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                self.finish(job, "length")

    def finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        job.send(_DONE)

    def new_text(self, job: Job) -> str:
        """The text the newest token adds, held back while it ends in a partial character."""
        prefix = self.tokenizer.decode(job.token_ids[job.prefix_offset:job.read_offset])
        full = self.tokenizer.decode(job.token_ids[job.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        job.prefix_offset, job.read_offset = job.read_offset, len(job.token_ids)
        return full[len(prefix):]


class StaticBatcher:
    """The worker thread: collect a batch, generate it to the end, repeat."""

    def __init__(self, model, tokenizer, max_batch_size: int, batch_wait_s: float):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.eos_token_id = tokenizer.eos_token_id
        threading.Thread(target=self.loop, daemon=True, name="static-batcher").start()

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def loop(self) -> None:
        while True:
            batch = [self.waiting.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.waiting.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self.generate(batch)
            except Exception as exc:  # one bad batch must not kill the server
                for job in batch:
                    if not job.done:
                        job.finish_reason = "error"
                        job.send(exc)

    @torch.inference_mode()
    def generate(self, batch: list[Job]) -> None:
        width = max(len(job.prompt_ids) for job in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])
        attention_mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch])
        longest = max(job.max_tokens for job in batch)
        kwargs = dict(max_new_tokens=longest, do_sample=False, pad_token_id=pad,
                      streamer=BatchStreamer(batch, self.tokenizer, self.eos_token_id))
        if all(job.ignore_eos for job in batch):
            kwargs["min_new_tokens"] = longest  # masks EOS for the whole run
        self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def build_app(model_path: str, max_batch_size: int = 32, batch_wait_s: float = 0.01, threads: int | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").eval()
    batcher = StaticBatcher(model, tokenizer, max_batch_size, batch_wait_s)
    model_name = str(model_path)
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "hf-static"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens", 16)
        if not isinstance(prompt, str):
            return _error(400, "prompt: a single string is supported")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens: must be a positive integer")
        job = Job(tokenizer.encode(prompt, add_special_tokens=False), max_tokens, bool(body.get("ignore_eos")),
                  asyncio.get_running_loop())
        batcher.submit(job)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(job, base, include_usage), media_type="text/event-stream")
        text = []
        while (item := await job.events.get()) is not _DONE:
            if isinstance(item, Exception):
                return _error(500, str(item))
            text.append(item)
        return {**base, "choices": [{"index": 0, "text": "".join(text), "finish_reason": job.finish_reason}],
                "usage": job.usage}

    def _error(status: int, message: str):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    async def _stream(job: Job, base: dict, include_usage: bool):
        while (item := await job.events.get()) is not _DONE:
            if isinstance(item, Exception):
                yield f"data: {json.dumps({'error': {'message': str(item)}})}\n\n"
                return
            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'text': item, 'finish_reason': None}]})}\n\n"
        last = {"index": 0, "text": "", "finish_reason": job.finish_reason}
        yield f"data: {json.dumps({**base, 'choices': [last]})}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': job.usage})}\n\n"
        yield "data: [DONE]\n\n"

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from punctual.bench.peers import resolve_checkpoint

    parser = argparse.ArgumentParser(description="a static-batching transformers server (a benchmark floor)")
    parser.add_argument("model", help="checkpoint directory, or builtin / builtin-tiny")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a batch gathers after its first request")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    app = build_app(str(resolve_checkpoint(args.model)), args.max_batch_size, args.batch_wait_ms / 1000, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
