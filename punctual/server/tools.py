"""Tool calling on chat completions: tools into the prompt, the model's tool-call text back into
OpenAI's `tool_calls`, and the grammar that makes a required or named call always parse.

Two formats, chosen from the chat template:
  hermes  <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, one per call (ChatML
          models: Qwen2, SmolLM2, Hermes); the default
  llama3  {"name": ..., "parameters": {...}} as the whole answer, optionally after <|python_tag|>
A template that does not render `tools` at all (the built-ins) gets Hermes' system prompt.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from punctual.structured.grammar import compact_schema
from punctual.structured.spec import StructuredOutput

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Here are the available "
    "tools: <tools>\n{tools}\n</tools>\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}}\n</tool_call>")


def tool_format(chat_template: str | None) -> str:
    template = chat_template or ""
    return "llama3" if PYTHON_TAG in template or "ipython" in template else "hermes"


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# ---- the prompt --------------------------------------------------------------------------
def chat_messages(messages: list[dict], tools: list[dict] | None, renders_tools: bool) -> list[dict]:
    """Messages for apply_chat_template. Templates that know tools take assistant `tool_calls`
    (arguments as objects) and `tool` messages as they are; for one that does not, tools go in a
    Hermes system prompt and calls and results are written as Hermes text."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            calls = [{"type": "function", "function": {"name": c["function"]["name"],
                                                       "arguments": _as_object(c["function"]["arguments"])}}
                     for c in calls]
            if renders_tools:
                m["tool_calls"] = calls
            else:
                text = "\n".join(f"{HERMES_OPEN}\n{json.dumps(c['function'])}\n{HERMES_CLOSE}" for c in calls)
                m["content"] = (m.get("content") or "") + text
        if m["role"] == "tool" and not renders_tools:
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        out.append(m)
    if tools and not renders_tools:
        system = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _as_object(arguments: str | dict) -> dict | str:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


# ---- the grammar for tool_choice required / named ----------------------------------------
def tool_call_grammar(tools: list[dict], fmt: str, parallel: bool) -> StructuredOutput:
    """A grammar whose every sentence parses as calls to the given tools (their parameters'
    schemas included): one call, or with `parallel` one or more."""
    options = []
    key = "parameters" if fmt == "llama3" else "arguments"
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, key: params},
                        "required": ["name", key], "additionalProperties": False})
    schema = json.dumps(compact_schema(options[0] if len(options) == 1 else {"anyOf": options}))
    if fmt == "llama3":
        return StructuredOutput("grammar", f"start: %json {schema}\n")
    call = f'call: "{HERMES_OPEN}\\n" %json {schema} "\\n{HERMES_CLOSE}"'
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return StructuredOutput("grammar", f"{start}\n{call}\n")


# ---- the model's text -> tool calls ------------------------------------------------------
class ToolCallParser:
    """Feeds on the generated text; gives back what is plain content and which calls completed,
    as soon as each is known (for streaming `delta.tool_calls`), and the rest at the end."""

    def __init__(self, fmt: str, known_names: set[str]):
        self.fmt = fmt
        self.known_names = known_names
        self.buffer = ""  # text not yet given back
        self.calls: list[ToolCall] = []
        self._llama_json: bool | None = None  # llama3: does the answer start as a call?

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        return self._hermes(final=False) if self.fmt == "hermes" else self._llama(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._hermes(final=True) if self.fmt == "hermes" else self._llama(final=True)

    def _hermes(self, final: bool) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        while True:
            start = self.buffer.find(HERMES_OPEN)
            if start < 0:
                # Hold back a tail that may be the start of "<tool_call>".
                keep = 0 if final else _partial_suffix(self.buffer, HERMES_OPEN)
                content += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            content += self.buffer[:start]
            self.buffer = self.buffer[start:]
            end = self.buffer.find(HERMES_CLOSE)
            if end < 0:
                if final:  # unterminated: a call if its JSON is whole, else text
                    call = self._call(self.buffer[len(HERMES_OPEN):])
                    if call is not None:
                        calls.append(call)
                    else:
                        content += self.buffer
                    self.buffer = ""
                break
            body = self.buffer[len(HERMES_OPEN):end]
            call = self._call(body)
            if call is not None:
                calls.append(call)
            else:
                content += self.buffer[:end + len(HERMES_CLOSE)]
            self.buffer = self.buffer[end + len(HERMES_CLOSE):]
        if calls or self.calls:  # whitespace between calls is not content
            content = content.strip() and content
        self.calls.extend(calls)
        return content, calls

    def _llama(self, final: bool) -> tuple[str, list[ToolCall]]:
        if self._llama_json is None:
            head = self.buffer.lstrip()
            if not head and not final:
                return "", []
            self._llama_json = head.startswith("{") or head.startswith(PYTHON_TAG)
        if not self._llama_json:
            content, self.buffer = self.buffer, ""
            return content, []
        if not final:
            return "", []
        text, self.buffer = self.buffer.strip().removeprefix(PYTHON_TAG), ""
        calls = [c for part in text.split(";") if (c := self._call(part)) is not None]
        if not calls:
            return text, []
        self.calls.extend(calls)
        return "", calls

    def _call(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body.strip())
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.known_names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        return ToolCall(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

