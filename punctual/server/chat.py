"""POST /v1/chat/completions: messages through the tokenizer's chat template, OpenAI's chat shapes."""
from __future__ import annotations

from functools import partial

from punctual.chat_template import apply_chat_template
from punctual.engine.output_processor import SampleState
from punctual.server.errors import bad_request
from punctual.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from punctual.server.serving import ChoiceCursor, Generation, OpenAIServing, finite
from punctual.server.tools import (ToolCall, ToolCallParser, chat_messages, template_renders_tools,
                                   tool_call_grammar, tool_format)
from punctual.structured.spec import StructuredOutput


def chat_prompt(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,
                add_special_tokens: bool = False, tools: list | None = None) -> tuple[str, list[int]]:
    """The text the chat template makes of `messages` (and `tools`), and its token ids; a 400 if
    the template fails. A template that ignores tools gets them in a Hermes-style system prompt."""
    dicts = []
    for m in messages:
        message = {"role": m.role, "content": m.text()}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        dicts.append(message)
    renders_tools = template_renders_tools(getattr(tokenizer, "chat_template", None))
    dicts = chat_messages(dicts, tools, renders_tools)
    extra = {"tools": tools} if tools and renders_tools else {}
    try:
        return apply_chat_template(tokenizer, dicts, add_generation_prompt, add_special_tokens, **extra)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None


class ChatServing(OpenAIServing):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def prompt_param(self) -> str:
        return "messages"

    def param_names(self, body: ChatCompletionRequest) -> dict[str, str]:
        max_tokens = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return {**super().param_names(body), "logprobs": "top_logprobs", "max_tokens": max_tokens}

    # ---- tools --------------------------------------------------------------------------
    def active_tools(self, body: ChatCompletionRequest) -> list[dict] | None:
        """The tools the model is offered (None: no tools, or tool_choice none)."""
        if body.tool_choice is not None and not body.tools and body.tool_choice != "none":
            raise bad_request("tool_choice needs tools", "tool_choice")
        if not body.tools or body.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in body.tools]

    def tool_format(self) -> str:
        return tool_format(getattr(self.engine.tokenizer, "chat_template", None))

    def structured_output(self, body: ChatCompletionRequest) -> tuple[StructuredOutput | None, str | None]:
        spec, param = super().structured_output(body)
        tools, choice = self.active_tools(body), body.tool_choice
        if tools is None or choice in (None, "auto"):
            return spec, param
        if spec is not None:
            raise bad_request("response_format cannot be combined with a required or named tool_choice", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == choice.function.name]
            if not tools:
                raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                  "tool_choice.function.name")
        # A required or named call is constrained by its parameters' schemas: it always parses.
        return tool_call_grammar(tools, self.tool_format(), body.parallel_tool_calls and choice == "required"), "tools"

    def tool_parser_factory(self, body: ChatCompletionRequest):
        tools = self.active_tools(body)
        if tools is None:
            return None
        return partial(ToolCallParser, self.tool_format(), {t["function"]["name"] for t in tools})

    # ---- the prompt ---------------------------------------------------------------------
    def build_prompts(self, body: ChatCompletionRequest) -> list[tuple[str | None, list[int]]]:
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if body.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is served by /v1/completions (with the chat template applied "
                              "by /tokenize, if needed)", "prompt_logprobs")
        tools = self.active_tools(body)
        return [chat_prompt(self.engine.tokenizer, body.messages, body.add_generation_prompt, tools=tools)]

    # ---- the answer ---------------------------------------------------------------------
    def logprobs(self, sample: SampleState, start: int, upto: int) -> dict | None:
        if sample.logprobs is None:
            return None
        k = sample.params.logprobs
        content = []
        for entry in sample.logprobs[start:upto]:
            token = self.token_text(entry.token_id)
            content.append({"token": token, "logprob": finite(entry.logprob), "bytes": list(token.encode()),
                            "top_logprobs": [{"token": self.token_text(t), "logprob": finite(lp),
                                              "bytes": list(self.token_text(t).encode())}
                                             for t, lp in entry.top[:k]]})
        return {"content": content}

    @staticmethod
    def finish_reason(sample: SampleState, made_calls: bool) -> str | None:
        if made_calls and sample.finish_reason == "stop":
            return "tool_calls"
        return sample.finish_reason

    def stream_chunks(self, generation: Generation, base: dict) -> list[dict]:
        chunks = []
        for index, sample in generation.choices():
            cursor = generation.cursors.get(index)
            if cursor is None:  # the first chunk of a choice names the role, as OpenAI's does
                cursor = generation.cursors[index] = ChoiceCursor()
                if generation.tool_parser_factory is not None:
                    cursor.tool_parser = generation.tool_parser_factory()
                chunks.append(self.chunk(base, index, {"role": "assistant", "content": ""}, None, None))
            if cursor.finish_sent:
                continue
            text = sample.take_delta()
            calls: list[ToolCall] = []
            if cursor.tool_parser is not None:
                text, calls = cursor.tool_parser.feed(text)
                if sample.finish_reason is not None:
                    rest, more = cursor.tool_parser.finish()
                    text, calls = text + rest, calls + more
            upto = len(sample.token_ids)
            logprobs = self.logprobs(sample, cursor.num_tokens, upto) if upto > cursor.num_tokens else None
            cursor.num_tokens = upto
            for call in calls:  # as OpenAI streams them: id and name first, then the arguments
                delta = {"index": cursor.num_tool_calls, "id": call.id, "type": "function",
                         "function": {"name": call.name, "arguments": ""}}
                chunks.append(self.chunk(base, index, {"tool_calls": [delta]}, None, None))
                chunks.append(self.chunk(base, index, {"tool_calls": [
                    {"index": cursor.num_tool_calls, "function": {"arguments": call.arguments}}]}, None, None))
                cursor.num_tool_calls += 1
            if not text and logprobs is None and sample.finish_reason is None:
                continue
            cursor.finish_sent = sample.finish_reason is not None
            chunks.append(self.chunk(base, index, {"content": text} if text else {}, logprobs,
                                     self.finish_reason(sample, cursor.num_tool_calls > 0)))
        return chunks

    @staticmethod
    def chunk(base: dict, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {**base, "object": ChatServing.chunk_object,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def full_response(self, generation: Generation, base: dict) -> dict:
        choices = []
        for index, sample in sorted(generation.choices(), key=lambda c: c[0]):
            message = {"role": "assistant", "content": sample.text}
            calls: list[ToolCall] = []
            if generation.tool_parser_factory is not None:
                parser = generation.tool_parser_factory()
                content, calls = parser.feed(sample.text)
                rest, more = parser.finish()
                content, calls = content + rest, calls + more
                message = {"role": "assistant", "content": content or None if calls else content}
                if calls:
                    message["tool_calls"] = [call.openai() for call in calls]
            choices.append({"index": index, "message": message,
                            "logprobs": self.logprobs(sample, 0, len(sample.token_ids)),
                            "finish_reason": self.finish_reason(sample, bool(calls))})
        return {**base, "object": "chat.completion", "choices": choices, "usage": generation.usage()}
