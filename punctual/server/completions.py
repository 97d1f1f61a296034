"""POST /v1/completions: prompts as text or token ids, OpenAI's legacy completion shapes."""
from __future__ import annotations

from punctual.engine.output_processor import SampleState
from punctual.server.errors import bad_request
from punctual.server.protocol import CompletionRequest
from punctual.server.serving import ChoiceCursor, Generation, OpenAIServing, finite


class CompletionServing(OpenAIServing):
    id_prefix = "cmpl"

    def prompt_param(self) -> str:
        return "prompt"

    def build_prompts(self, body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        if body.echo:
            raise bad_request("echo is not supported", "echo")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        prompt = body.prompt
        if isinstance(prompt, str):
            return [(prompt, self.engine.tokenizer.encode(prompt))]
        if not prompt:
            raise bad_request("the prompt is empty: give at least one token", "prompt")
        if isinstance(prompt[0], str):
            return [(text, self.engine.tokenizer.encode(text)) for text in prompt]
        if isinstance(prompt[0], int):
            return [(None, list(prompt))]
        return [(None, list(token_ids)) for token_ids in prompt]

    def logprobs(self, sample: SampleState, cursor: ChoiceCursor, upto: int) -> dict | None:
        """OpenAI's legacy shape for the sample's tokens from the cursor to `upto`; advances the cursor."""
        if sample.logprobs is None:
            return None
        entries = sample.logprobs[cursor.num_tokens:upto]
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        k = sample.params.logprobs
        for entry in entries:
            token = self.token_text(entry.token_id)
            tokens.append(token)
            token_logprobs.append(finite(entry.logprob))
            top = {self.token_text(t): finite(lp) for t, lp in entry.top[:k]}
            top.setdefault(token, finite(entry.logprob))
            top_logprobs.append(top)
            offsets.append(cursor.text_offset)
            cursor.text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def stream_chunks(self, generation: Generation, base: dict) -> list[dict]:
        chunks = []
        for index, sample in generation.choices():
            cursor = generation.cursors.setdefault(index, ChoiceCursor())
            if cursor.finish_sent:
                continue
            text = sample.take_delta()
            upto = len(sample.token_ids)
            logprobs = self.logprobs(sample, cursor, upto) if upto > cursor.num_tokens else None
            cursor.num_tokens = upto
            if not text and logprobs is None and sample.finish_reason is None:
                continue  # held back (a possible stop string) or not yet decodable
            cursor.finish_sent = sample.finish_reason is not None
            chunks.append({**base, "object": self.chunk_object, "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": sample.finish_reason}]})
        return chunks

    def full_response(self, generation: Generation, base: dict) -> dict:
        choices = []
        for index, sample in sorted(generation.choices(), key=lambda c: c[0]):
            logprobs = self.logprobs(sample, ChoiceCursor(), len(sample.token_ids))
            choices.append({"index": index, "text": sample.text, "logprobs": logprobs,
                            "finish_reason": sample.finish_reason})
        return {**base, "object": "text_completion", "choices": choices, "usage": generation.usage()}
