"""The OpenAI routes as a client sees them: shapes, streaming, n, stops, usage, and greedy text."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from punctual import LLM, SamplingParams
from waiting import wait_until

MODEL = "builtin-tiny"

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline():
    return LLM(MODEL, kv_cache_memory="64MiB")


def test_completion_greedy_matches_offline(client, offline):
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.object == "text_completion" and response.model == MODEL


def test_completion_stream_matches_non_stream_and_counts_tokens(client, offline):
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0]
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       logprobs=0, stream_options={"include_usage": True})
    text, streamed_tokens, finish, usage = "", 0, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            streamed_tokens += len(choice.logprobs.tokens) if choice.logprobs else 0
            finish = choice.finish_reason or finish
    assert text == expected.outputs[0].text
    assert finish == "length"
    assert usage.completion_tokens == streamed_tokens == 10
    assert usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert usage.model_extra["engine_ttft_ms"] > 0 and usage.model_extra["server_ttft_ms"] > 0


def test_completion_prompt_forms(client, offline):
    ids = offline.tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(offline.tokenizer.encode("Hello"))
    assert batch.usage.completion_tokens == 4 * 6


def test_n_samples_and_usage_summed(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=3, seed=7,
                                         temperature=1.0, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert response.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in response.choices) == 15
    for choice in response.choices:
        assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.top_logprobs) == 5
        assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=3, seed=7, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in response.choices]  # seeded


def test_stop_string_ends_text_before_it(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].text == full[:full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == response.choices[0].text


def test_chat_greedy_matches_offline_with_template(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = offline.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = offline.tokenizer.encode(text, add_special_tokens=False)
    expected = offline.generate({"prompt_token_ids": prompt_ids}, SamplingParams(max_tokens=8, temperature=0),
                                use_tqdm=False)[0]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8,
                                              temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, logprobs=True, top_logprobs=3,
                                            stream_options={"include_usage": True})
    content, roles, tokens, usage = "", [], 0, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            content += choice.delta.content or ""
            if choice.logprobs is not None:
                tokens += len(choice.logprobs.content)
                assert all(len(entry.top_logprobs) == 3 for entry in choice.logprobs.content)
    assert roles == ["assistant"]
    assert content == expected.outputs[0].text
    assert usage.completion_tokens == tokens == len(expected.outputs[0].token_ids)


def test_chat_n_and_penalties_and_extensions(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me"}], n=2, max_tokens=6, temperature=0.8,
        top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, seed=1, user="tester",
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2, "ignore_eos": True,
                    "ttft_slo_ms": 500, "tpot_slo_ms": 50, "priority": 1})
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 12


def test_models_version_health_openapi(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    version = httpx.get(f"{server.url}/version").json()
    assert version["engine_pid"] == server.engine_pid and version["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/completions" in schema["paths"] and "/v1/chat/completions" in schema["paths"]


def test_metrics_exposes_latency_and_engine_state(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("punctual_time_to_first_token_seconds_bucket", "punctual_time_per_output_token_seconds_count",
                 "punctual_inter_token_latency_seconds_count", "punctual_e2e_request_latency_seconds_count",
                 "punctual_num_requests_waiting", "punctual_num_requests_running", "punctual_kv_blocks_used",
                 "punctual_kv_blocks_free", "punctual_num_preemptions_total", "punctual_prompt_tokens_total",
                 "punctual_generation_tokens_total"):
        assert f"\n{name}" in text, name
    assert server.metric("punctual_generation_tokens_total") >= 4


def test_64_concurrent_streams_finish_and_free_every_block(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.completions.create(model=MODEL, prompt=f"Request number {i}", max_tokens=8,
                                                 stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def run() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(run()) == [8] * 64
    assert server.metric("punctual_kv_blocks_used") == 0
    assert server.metric("punctual_num_requests_running") == 0
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_raw_sse_framing_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][len("data: "):])["object"] == "text_completion"


def test_pin_prefix_is_reused_and_unpinned(server):
    document = "The quarterly report covers revenue, costs and the outlook for the next year. " * 4
    pinned = httpx.post(f"{server.url}/v1/cache/pin", json={"prompt": document, "pin_id": "report"}, timeout=10)
    assert pinned.status_code == 200 and pinned.json()["pin_id"] == "report"
    again = httpx.post(f"{server.url}/v1/cache/pin", json={"prompt": document, "pin_id": "report"}, timeout=10)
    assert again.status_code == 409 and again.json()["error"]["param"] == "pin_id"
    hits_before = server.metric("punctual_prefix_cache_hits_total")
    response = httpx.post(f"{server.url}/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": document + " Summary:", "max_tokens": 2})
    assert response.status_code == 200
    assert server.metric("punctual_prefix_cache_hits_total") - hits_before >= 16  # at least one block reused
    assert httpx.post(f"{server.url}/v1/cache/unpin", json={"pin_id": "report"}, timeout=10).json()["unpinned"]
    missing = httpx.post(f"{server.url}/v1/cache/unpin", json={"pin_id": "report"}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "pin_not_found"
    bad = httpx.post(f"{server.url}/v1/cache/pin", json={"prompt": "x", "prompt_token_ids": [1]}, timeout=10)
    assert bad.status_code == 400


def test_pin_then_unpin_at_once_leaks_no_block(launch_server):
    """The seams issue's reproduction: a 200-token pin prefills over 13 steps of 16 tokens; an
    unpin sent at once cancels it, and every KV block comes back."""
    small = launch_server("--max-model-len", "256", "--max-num-batched-tokens", "16")
    document = list(range(10, 210))
    pinned = httpx.post(f"{small.url}/v1/cache/pin", json={"prompt_token_ids": document, "pin_id": "doc"}, timeout=10)
    assert pinned.status_code == 200 and pinned.json()["num_tokens"] == 200
    unpinned = httpx.post(f"{small.url}/v1/cache/unpin", json={"pin_id": "doc"}, timeout=10)
    assert unpinned.status_code == 200 and unpinned.json()["unpinned"]
    wait_until(lambda: small.metric("punctual_kv_blocks_used") == 0, message="the cancelled pin kept its blocks")
    assert httpx.post(f"{small.url}/v1/cache/unpin", json={"pin_id": "doc"}, timeout=10).status_code == 404
    # A prefix the core cannot take is refused with a 4xx that says why, not accepted and dropped.
    too_long = httpx.post(f"{small.url}/v1/cache/pin", json={"prompt_token_ids": list(range(256))}, timeout=10)
    assert too_long.status_code == 400 and "context window is 256" in too_long.json()["error"]["message"]
    fits = httpx.post(f"{small.url}/v1/cache/pin", json={"prompt_token_ids": list(range(255)), "pin_id": "max"},
                      timeout=10)
    assert fits.status_code == 200  # the longest prompt the engine takes is the longest prefix it pins
    assert small.engine_alive()  # --check-integrity held whenever the core went idle
