"""SSE decoding against canned streams, and the load generator against a scripted fake server."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from punctual.bench.loadgen import Endpoint, RequestRecord, apply_event, run
from punctual.bench.sse import SSEDecoder
from punctual.bench.workloads import BenchRequest


def chunk(text, finish=None):
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]}) + "\n\n"


USAGE = "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}) + "\n\n"
# llama.cpp-like: an empty first chunk before prefill ends, then tokens, usage, DONE.
CANNED = chunk("") + chunk("Hello") + chunk(" wor") + chunk("ld!", "length") + USAGE + "data: [DONE]\n\n"


def test_sse_decoder_survives_any_split():
    whole = CANNED.encode()
    expected = SSEDecoder().feed(whole)
    assert len(expected) == 6 and expected[-1] == "[DONE]"
    for size in (1, 2, 3, 7, 64):
        decoder, events = SSEDecoder(), []
        for i in range(0, len(whole), size):
            events += decoder.feed(whole[i:i + size])
        assert events + decoder.close() == expected


def test_sse_decoder_line_endings_comments_and_multiline_data():
    decoder = SSEDecoder()
    stream = b": keep-alive\r\n\r\nevent: x\r\ndata: a\r\ndata:b\r\n\r\ndata: c\r\rdata: tail"
    events = decoder.feed(stream)
    assert events == ["a\nb", "c"]
    assert decoder.close() == ["tail"]  # an unterminated last event still counts
    split_crlf = SSEDecoder()
    assert split_crlf.feed(b"data: x\r") == [] and split_crlf.feed(b"\n\r\n") == ["x"]


def test_events_fold_into_a_record():
    record = RequestRecord(0, prompt_len=5, output_len=4)
    for i, data in enumerate(SSEDecoder().feed(CANNED.encode())):
        apply_event(record, data, elapsed_s=0.1 * (i + 1))
    assert record.ttft_s == pytest.approx(0.2)   # the empty first chunk does not count
    assert record.token_times_s == pytest.approx([0.2, 0.3, 0.4])
    assert record.output_tokens == 4             # from usage, not the 3 chunks
    assert record.prompt_tokens == 7 and record.finish_reason == "length" and record.ok
    bad = RequestRecord(1, 5, 4)
    apply_event(bad, json.dumps({"error": {"message": "too long", "type": "invalid_request_error"}}), 0.1)
    assert bad.error == "too long"


def fake_server(gap_s=0.01, fail_every=0):
    """A transport that streams `max_tokens` one-word chunks `gap_s` apart, recording request bodies."""
    bodies, active, peak = [], [0], [0]

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        bodies.append(body)
        if fail_every and len(bodies) % fail_every == 0:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})

        async def stream():
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            try:
                yield chunk("").encode()
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(gap_s)
                    yield chunk(f" w{i}").encode()
                usage = {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}
                yield ("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\ndata: [DONE]\n\n").encode()
            finally:
                active[0] -= 1

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler), bodies, peak


def requests(n, output_len=4, user=None):
    return [BenchRequest(f"prompt {i}", 2, output_len, user) for i in range(n)]


def test_open_loop_times_every_token_and_phrases_the_request():
    transport, bodies, _ = fake_server(gap_s=0.02)
    endpoint = Endpoint("http://127.0.0.1:9", api_key="k")
    result = run(endpoint, requests(3, user="t1"), offsets=[0.0, 0.05, 0.1], progress=False, transport=transport)
    assert [r.ok for r in result.records] == [True] * 3
    for record in result.records:
        assert record.output_tokens == 4 and len(record.token_times_s) == 4
        assert record.ttft_s >= 0.02 and all(gap >= 0.015 for gap in record.itl_s)
        assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 3)
    # Open loop: each request waits for its offset, and they go out in the offsets' order (how late
    # each goes out depends on the machine's load, so no upper bound).
    assert [r.scheduled_s for r in result.records] == [0.0, 0.05, 0.1]
    assert all(r.sent_s >= r.scheduled_s - 0.001 for r in result.records)  # the loop may wake a tick early
    assert [b["prompt"] for b in bodies] == ["prompt 0", "prompt 1", "prompt 2"]
    body = bodies[0]
    assert body["model"] == "fake-model" and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 4 and body["user"] == "t1"
    assert body["skip_special_tokens"] is False
    assert "n_predict" not in body
    assert result.duration_s >= 0.1


def test_closed_loop_keeps_concurrency_and_llama_cpp_style():
    transport, bodies, peak = fake_server(gap_s=0.005)
    endpoint = Endpoint("http://127.0.0.1:9/v1", model="m", style="llama.cpp")
    result = run(endpoint, requests(8, output_len=3), concurrency=2, progress=False, transport=transport)
    assert all(r.ok for r in result.records)
    assert peak[0] == 2
    assert all(b["n_predict"] == 3 and b["model"] == "m" for b in bodies)


def test_http_errors_are_recorded_not_raised():
    transport, _, _ = fake_server(fail_every=2)
    result = run(Endpoint("http://127.0.0.1:9"), requests(4), concurrency=1, progress=False, transport=transport)
    errors = [r.error for r in result.records]
    assert sum(e is not None for e in errors) == 2
    assert any(e and e.startswith("HTTP 503") for e in errors)


def test_run_validates_its_arrival_arguments():
    with pytest.raises(ValueError, match="offsets"):
        run(Endpoint("http://127.0.0.1:9"), requests(2), offsets=[0.0], progress=False)
    with pytest.raises(ValueError, match="trace"):
        run(Endpoint("http://127.0.0.1:9"), requests(2), progress=False)
    with pytest.raises(ValueError, match="style"):
        Endpoint("http://x", style="vllm")


def _serve_once(body_text: str) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        return httpx.Response(200, content=body_text.encode(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_tokens_without_visible_text_are_an_answer_seen_at_the_end():
    """Generated tokens that all decode to nothing (special tokens) are not a failed request:
    the user saw the answer only when it ended, so that is its first token."""
    silent = chunk("") + chunk("", "length") + USAGE + "data: [DONE]\n\n"
    result = run(Endpoint("http://127.0.0.1:9"), requests(1), concurrency=1, progress=False,
                 transport=_serve_once(silent))
    record = result.records[0]
    assert record.ok and record.output_tokens == 4 and record.ttft_s == record.e2e_s
    # A stream that ends with neither text nor a usage count is still an error.
    broken = chunk("") + "data: [DONE]\n\n"
    result = run(Endpoint("http://127.0.0.1:9"), requests(1), concurrency=1, progress=False,
                 transport=_serve_once(broken))
    assert result.records[0].error == "the stream carried no tokens"
