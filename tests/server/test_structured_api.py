"""Structured output and tool calling through the openai client against `punctual serve`:
random weights give random text, so every constrained answer parsing is the point."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field


class Pick(BaseModel):
    color: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=99)
    ok: bool


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "b": {"enum": ["x", "y"]}}, "required": ["a", "b"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def spec_client(launch_server):
    server = launch_server("--speculative-method", "ngram")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask_parse(client, i: int):
    return client.beta.chat.completions.parse(
        model="builtin-tiny", messages=[{"role": "user", "content": f"pick {i} {i} {i}"}], response_format=Pick,
        max_tokens=80, temperature=1.0, seed=i, n=2 if i % 2 else 1)


def check_schema(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"a", "b"} and 0 <= value["a"] <= 9 and value["b"] in ("x", "y")
    return value


def test_parse_under_batching(client):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: ask_parse(client, i), range(8)))
    for result in results:
        for choice in result.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Pick)


@pytest.mark.slow  # starts a second server, with speculation
def test_schema_with_speculation(spec_client):
    # A repetitive prompt gives prompt lookup proposals to check against the grammar.
    prompt = '{"a": 1, "b": "x"} {"a": 1, "b": "x"} {"a": 1, "b": "x"} {"a": 1, "b": "x"}'

    def ask(i: int):
        return spec_client.completions.create(
            model="builtin-tiny", prompt=prompt, max_tokens=40, temperature=0 if i % 2 else 0.8, seed=i,
            extra_body={"structured_outputs": {"json": SCHEMA}})

    with ThreadPoolExecutor(6) as pool:
        for result in pool.map(ask, range(6)):
            assert result.choices[0].finish_reason == "stop"
            check_schema(result.choices[0].text)
    response = spec_client.chat.completions.create(
        model="builtin-tiny", messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "ab", "schema": SCHEMA, "strict": True}})
    check_schema(response.choices[0].message.content)


def test_regex_choice_grammar_json_object(client):
    def complete(extension: dict, **kw) -> str:
        return client.completions.create(model="builtin-tiny", prompt="answer:", max_tokens=30, temperature=1.0,
                                         extra_body={"structured_outputs": extension}, **kw).choices[0].text

    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", complete({"regex": "[0-9]{3}-[a-z]{2}"}))
    assert complete({"choice": ["alpha", "beta gamma"]}) in ("alpha", "beta gamma")
    assert complete({"grammar": 'start: "yes" | "no" | "n/a"'}) in ("yes", "no", "n/a")
    assert complete({"grammar": 'root ::= "up" | "down"'}) in ("up", "down")
    text = client.chat.completions.create(
        model="builtin-tiny", messages=[{"role": "user", "content": "json"}], max_tokens=200, temperature=0,
        response_format={"type": "json_object"}).choices[0]
    if text.finish_reason == "stop":
        assert isinstance(json.loads(text.message.content), dict)
    else:
        assert text.message.content.startswith("{")


def test_tool_calls_required_named_and_streamed(client):
    messages = [{"role": "user", "content": "weather in Paris?"}]
    response = client.chat.completions.create(model="builtin-tiny", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    json.loads(call.function.arguments)

    named = client.chat.completions.create(
        model="builtin-tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7

    # Streamed: delta.tool_calls as OpenAI sends them, assembled by index.
    stream = client.chat.completions.create(
        model="builtin-tiny", messages=messages, tools=[WEATHER], max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            if part.function.name:
                entry["name"] = part.function.name
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    streamed = json.loads(calls[0]["arguments"])
    assert streamed["city"] in ("Paris", "Oslo") and 1 <= streamed["days"] <= 7

    # The conversation continues with the call and its result; auto may answer anything.
    follow = client.chat.completions.create(model="builtin-tiny", tools=[WEATHER], max_tokens=10, messages=[
        *messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_structured_requests_are_400(server, body, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
