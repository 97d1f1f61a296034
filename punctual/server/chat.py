"""POST /v1/chat/completions: messages through the tokenizer's chat template, OpenAI's chat shapes."""
from __future__ import annotations

from punctual.engine.output_processor import SampleState
from punctual.server.errors import bad_request
from punctual.server.protocol import ChatCompletionRequest, ChatMessage
from punctual.server.serving import ChoiceCursor, Generation, OpenAIServing, finite


def chat_prompt(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool,
                add_special_tokens: bool = False) -> tuple[str, list[int]]:
    """The text the chat template makes of `messages`, and its token ids; a 400 if the template fails."""
    dicts = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    try:
        text = tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # no template, or the template refused these messages
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
    # The template already wrote the special tokens; by default the tokenizer adds no more.
    return text, tokenizer.encode(text, add_special_tokens=add_special_tokens)


class ChatServing(OpenAIServing):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def prompt_param(self) -> str:
        return "messages"

    def param_names(self, body: ChatCompletionRequest) -> dict[str, str]:
        max_tokens = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return {**super().param_names(body), "logprobs": "top_logprobs", "max_tokens": max_tokens}

    def build_prompts(self, body: ChatCompletionRequest) -> list[tuple[str | None, list[int]]]:
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        return [chat_prompt(self.engine.tokenizer, body.messages, body.add_generation_prompt)]

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

    def stream_chunks(self, generation: Generation, base: dict) -> list[dict]:
        chunks = []
        for index, sample in generation.choices():
            cursor = generation.cursors.get(index)
            if cursor is None:  # the first chunk of a choice names the role, as OpenAI's does
                cursor = generation.cursors[index] = ChoiceCursor()
                chunks.append(self.chunk(base, index, {"role": "assistant", "content": ""}, None, None))
            if cursor.finish_sent:
                continue
            text = sample.take_delta()
            upto = len(sample.token_ids)
            logprobs = self.logprobs(sample, cursor.num_tokens, upto) if upto > cursor.num_tokens else None
            cursor.num_tokens = upto
            if not text and logprobs is None and sample.finish_reason is None:
                continue
            cursor.finish_sent = sample.finish_reason is not None
            chunks.append(self.chunk(base, index, {"content": text} if text else {}, logprobs,
                                     sample.finish_reason))
        return chunks

    @staticmethod
    def chunk(base: dict, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {**base, "object": ChatServing.chunk_object,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def full_response(self, generation: Generation, base: dict) -> dict:
        choices = [{"index": index, "message": {"role": "assistant", "content": sample.text},
                    "logprobs": self.logprobs(sample, 0, len(sample.token_ids)),
                    "finish_reason": sample.finish_reason}
                   for index, sample in sorted(generation.choices(), key=lambda c: c[0])]
        return {**base, "object": "chat.completion", "choices": choices, "usage": generation.usage()}
