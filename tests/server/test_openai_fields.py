"""Every OpenAI field honoured as OpenAI defines it, or refused: logit_bias (offline and over
HTTP, speculative rows included), json_schema keys in the schema's order, and a 400 naming any
field Punctual does not implement, bar the documented few it accepts and ignores."""
from __future__ import annotations

import json
import re

import httpx
import pytest

from punctual import LLM, SamplingParams
from punctual.bench.loadgen import Endpoint
from punctual.bench.workloads import BenchRequest
from punctual.server.protocol import IGNORED_FIELDS
from punctual.structured.spec import StructuredOutput

MODEL = "builtin-tiny"
PROMPT_IDS = [1, 450, 996, 1354, 701, 916]
N = 6


@pytest.fixture(scope="module")
def offline():
    return LLM(MODEL, kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


def greedy_ids(llm: LLM, prompt_ids: list[int], bias: dict[int, float] | None = None) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, logit_bias=bias)
    return list(llm.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)[0].outputs[0].token_ids)


def text_of(llm: LLM, token_ids: list[int]) -> str:
    return llm.tokenizer.decode(token_ids, skip_special_tokens=True)


def completion(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": N,
                                           "temperature": 0, "ignore_eos": True, **body})


def chat(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": N, "temperature": 0, "ignore_eos": True, **body})


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def assert_refused(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


# ---- logit_bias ------------------------------------------------------------------------------
def test_logit_bias_offline_bans_and_forces(offline):
    plain = greedy_ids(offline, PROMPT_IDS)
    banned = plain[0]
    unbanned = greedy_ids(offline, PROMPT_IDS, {banned: -100})
    assert banned not in unbanned
    forced = next(t for t in range(300, 2000) if t not in plain)
    assert greedy_ids(offline, PROMPT_IDS, {forced: 100}) == [forced] * N
    with pytest.raises(ValueError, match="logit_bias keys must be token ids in"):
        greedy_ids(offline, PROMPT_IDS, {10**6: 1.0})


def test_logit_bias_holds_through_speculative_verification(offline):
    """Prompt lookup proposes the loop the model has fallen into; with a bias the verifier's
    argmax must be the biased one, or the banned token comes back as a 'correction'."""
    spec = LLM(MODEL, kv_cache_memory="64MiB", speculative_method="ngram", num_speculative_tokens=4)
    prompt = PROMPT_IDS * 3
    banned = greedy_ids(offline, prompt)[0]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logit_bias={banned: -100})
    expected = offline.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    got = spec.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert banned not in got and list(got) == list(expected)
    assert spec.engine.core.speculator.stats.num_accepted_tokens > 0  # verification rows were used


def test_logit_bias_over_http_bans_and_forces(http, offline):
    plain = greedy_ids(offline, PROMPT_IDS)
    assert ok(completion(http))["choices"][0]["text"] == text_of(offline, plain)
    banned = plain[0]
    text = ok(completion(http, logit_bias={str(banned): -100}))["choices"][0]["text"]
    assert text == text_of(offline, greedy_ids(offline, PROMPT_IDS, {banned: -100}))
    assert text != text_of(offline, plain)
    forced = next(t for t in range(300, 2000) if t not in plain)
    assert ok(completion(http, logit_bias={str(forced): 100}))["choices"][0]["text"] == text_of(offline, [forced] * N)
    # Chat: the templated prompt's tokens, as the server builds them, give the unbiased pick to ban.
    chat_ids = ok(http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}))["tokens"]
    chat_banned = greedy_ids(offline, chat_ids)[0]
    content = ok(chat(http, logit_bias={str(chat_banned): -100.0}))["choices"][0]["message"]["content"]
    assert content == text_of(offline, greedy_ids(offline, chat_ids, {chat_banned: -100}))
    assert ok(chat(http, logit_bias={str(forced): 100}))["choices"][0]["message"]["content"] == \
        text_of(offline, [forced] * N)


@pytest.mark.parametrize("bias,why", [
    ({"abc": 1}, "token ids"), ({"-3": 1}, "token ids"), ({"07": 1}, "token ids"),
    ({"5": 100.5}, r"\[-100, 100\]"), ({"5": -101}, r"\[-100, 100\]"), ({"5": "1"}, "number"),
    ({"2048": 1}, r"\[0, 2048\)"), ({str(i): 1 for i in range(301)}, "at most 300"),
])
def test_bad_logit_bias_is_a_400_naming_it(http, bias, why):
    for send in (completion, chat):
        message = assert_refused(send(http, logit_bias=bias), "logit_bias")
        assert re.search(why, message), message


# ---- json_schema key order -------------------------------------------------------------------
ORDERED_SCHEMA = {"type": "object", "properties": {"zeta_reasoning": {"type": "string", "maxLength": 12},
                                                   "answer": {"enum": ["yes", "no"]}},
                  "required": ["zeta_reasoning", "answer"], "additionalProperties": False}


def test_json_schema_output_keeps_the_schemas_key_order(http, offline):
    params = SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutput.json_schema(ORDERED_SCHEMA))
    text = offline.generate("Is it?", params, use_tqdm=False)[0].outputs[0].text
    assert list(json.loads(text)) == ["zeta_reasoning", "answer"], text
    response = ok(chat(http, max_tokens=40, ignore_eos=False, response_format={
        "type": "json_schema", "json_schema": {"name": "ordered", "schema": ORDERED_SCHEMA, "strict": True}}))
    content = response["choices"][0]["message"]["content"]
    assert list(json.loads(content, object_pairs_hook=lambda pairs: [k for k, _ in pairs])) == \
        ["zeta_reasoning", "answer"], content


# ---- fields Punctual does not implement --------------------------------------------------------
IGNORED_VALUES = {"store": True, "metadata": {"team": "a"}, "service_tier": "flex", "prompt_cache_key": "k1",
                  "prompt_cache_retention": "24h", "safety_identifier": "u-1",
                  "prediction": {"type": "content", "content": "hello"}}


def test_ignored_fields_are_accepted_and_change_nothing(http):
    assert set(IGNORED_VALUES) == set(IGNORED_FIELDS)  # the test covers the whole table
    plain = ok(completion(http))["choices"][0]["text"]
    with_them = ok(completion(http, best_of=1, cache_salt="s", **IGNORED_VALUES))
    assert with_them["choices"][0]["text"] == plain
    plain_chat = ok(chat(http))["choices"][0]["message"]["content"]
    chat_with_them = ok(chat(http, modalities=["text"], parallel_tool_calls=True, cache_salt="s", **IGNORED_VALUES))
    assert chat_with_them["choices"][0]["message"]["content"] == plain_chat
    streamed = completion(http, stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("send,field,value,param", [
    (completion, "frobnicate", 1, "frobnicate"),
    (completion, "best_of", 3, "best_of"),
    (completion, "use_beam_search", True, "use_beam_search"),  # a vLLM extra Punctual lacks
    (completion, "stream_options", {"include_usage": True, "continuous_usage_stats": True},
     "stream_options.continuous_usage_stats"),
    (completion, "stream_options", {"include_obfuscation": True}, "stream_options.include_obfuscation"),
    (completion, "structured_outputs", {"json": {}, "whitespace_pattern": " "}, "structured_outputs.whitespace_pattern"),
    (chat, "functions", [{"name": "f", "parameters": {}}], "functions"),
    (chat, "function_call", "auto", "function_call"),
    (chat, "audio", {"voice": "alloy", "format": "wav"}, "audio"),
    (chat, "modalities", ["text", "audio"], "modalities.1"),
    (chat, "reasoning_effort", "low", "reasoning_effort"),
    (chat, "verbosity", "low", "verbosity"),
    (chat, "web_search_options", {}, "web_search_options"),
    (chat, "chat_template_kwargs", {"enable_thinking": False}, "chat_template_kwargs"),
    (chat, "response_format", {"type": "json_object", "schema": {}}, "response_format.schema"),
    (chat, "tools", [{"type": "function", "function": {"name": "f", "strict": True, "x": 1}}], "tools.0.function.x"),
])
def test_unimplemented_fields_are_a_400_naming_them(http, send, field, value, param):
    assert_refused(send(http, **{field: value}), param)


def test_what_punctual_and_its_bench_send_is_accepted(http):
    """Every extension Punctual implements, and the load generator's body (as `punctual bench`
    and the sweep send it), still pass the unknown-field check."""
    ok(completion(http, n=2, seed=3, temperature=0.5, top_p=0.9, top_k=20, min_p=0.01, repetition_penalty=1.1,
                  presence_penalty=0.1, frequency_penalty=0.1, min_tokens=1, stop=["zzz"], stop_token_ids=[2],
                  include_stop_str_in_output=False, skip_special_tokens=True, ttft_slo_ms=5000, tpot_slo_ms=500,
                  priority=1, user="tenant", logprobs=1, echo=True, prompt_logprobs=1, suffix=None,
                  structured_outputs={"regex": "[a-z]+"}, logit_bias={"5": 1}))
    ok(chat(http, max_completion_tokens=N, logprobs=True, top_logprobs=2, add_generation_prompt=True,
            tools=[{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}],
            tool_choice="auto", parallel_tool_calls=False, response_format={"type": "text"}))
    endpoint = Endpoint("unused", extra_body={"temperature": 0.0, "top_k": 5})
    body = endpoint.body(BenchRequest("a b c", 3, 2, user="t0"), MODEL)
    streamed = http.post("/v1/completions", json=body)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text, streamed.text
