"""POST /v1/completions: prompts as text or token ids, OpenAI's legacy completion shapes."""
from __future__ import annotations

from punctual.engine.output_processor import ParentState, SampleState
from punctual.request import TokenLogprobs
from punctual.server.errors import bad_request
from punctual.server.protocol import CompletionRequest
from punctual.server.serving import ChoiceCursor, Generation, OpenAIServing, finite


class CompletionServing(OpenAIServing):
    id_prefix = "cmpl"

    def prompt_param(self) -> str:
        return "prompt"

    def build_prompts(self, body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
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
        k = sample.params.logprobs
        return self._legacy_logprobs([(e.token_id, e) for e in entries], k, cursor)

    def _legacy_logprobs(self, entries: list[tuple[int, TokenLogprobs | None]], k: int,
                         cursor: ChoiceCursor) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in entries:
            token = self.token_text(token_id)
            tokens.append(token)
            if entry is None:  # the prompt's first token: nothing before it to predict it
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(finite(entry.logprob))
                top = {self.token_text(t): finite(lp) for t, lp in entry.top[:k]}
                top.setdefault(token, finite(entry.logprob))
                top_logprobs.append(top)
            offsets.append(cursor.text_offset)
            cursor.text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    @staticmethod
    def _merge(first: dict | None, second: dict | None) -> dict | None:
        if first is None or second is None:
            return first or second
        return {key: first[key] + second[key] for key in first}

    def _echo(self, body: CompletionRequest, parent: ParentState, cursor: ChoiceCursor) -> tuple[str, dict | None]:
        """The prompt as the choice's text starts with it under echo, and its logprobs."""
        text = parent.prompt if parent.prompt is not None else self.engine.tokenizer.decode(parent.prompt_token_ids)
        if body.logprobs is None:
            cursor.text_offset += len(text)
            return text, None
        scored = parent.prompt_logprobs or []
        entries = list(zip(parent.prompt_token_ids, scored + [None] * (len(parent.prompt_token_ids) - len(scored))))
        logprobs = self._legacy_logprobs(entries, body.logprobs, cursor)
        cursor.text_offset = len(text)  # token texts need not add up to the prompt text
        return text, logprobs

    def _prompt_logprobs(self, parent: ParentState) -> list | None:
        """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, decoded_token}}."""
        if parent.prompt_logprobs is None:
            return None
        out = []
        for entry in parent.prompt_logprobs:
            if entry is None:
                out.append(None)
                continue
            alternatives = {entry.token_id: entry.logprob, **{t: lp for t, lp in entry.top}}
            out.append({str(t): {"logprob": finite(lp), "decoded_token": self.token_text(t)}
                        for t, lp in alternatives.items()})
        return out

    def _parents(self, generation: Generation) -> dict[int, ParentState]:
        return {i * len(h.state.samples) + s.index: h.state
                for i, h in enumerate(generation.handles) for s in h.state.samples}

    def stream_chunks(self, generation: Generation, base: dict) -> list[dict]:
        body: CompletionRequest = generation.body
        parents = self._parents(generation) if body.echo or body.prompt_logprobs is not None else {}
        chunks = []
        for index, sample in generation.choices():
            cursor = generation.cursors.setdefault(index, ChoiceCursor())
            if cursor.finish_sent:
                continue
            prefix, prefix_logprobs, extra = "", None, {}
            if index in parents and not cursor.echoed:
                if not sample.token_ids and sample.finish_reason is None:
                    continue  # the prompt's scores are complete once its first token is out
                cursor.echoed = True
                if body.echo:
                    prefix, prefix_logprobs = self._echo(body, parents[index], cursor)
                if body.prompt_logprobs is not None:
                    extra["prompt_logprobs"] = self._prompt_logprobs(parents[index])
            if body.score_only:
                text, logprobs = "", None
                cursor.num_tokens = len(sample.token_ids)
            else:
                text = sample.take_delta()
                upto = len(sample.token_ids)
                logprobs = self.logprobs(sample, cursor, upto) if upto > cursor.num_tokens else None
                cursor.num_tokens = upto
            text, logprobs = prefix + text, self._merge(prefix_logprobs, logprobs)
            if not text and logprobs is None and sample.finish_reason is None and not extra:
                continue  # held back (a possible stop string) or not yet decodable
            cursor.finish_sent = sample.finish_reason is not None
            chunks.append({**base, "object": self.chunk_object, "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": sample.finish_reason,
                 **extra}]})
        return chunks

    def full_response(self, generation: Generation, base: dict) -> dict:
        body: CompletionRequest = generation.body
        parents = self._parents(generation)
        choices = []
        for index, sample in sorted(generation.choices(), key=lambda c: c[0]):
            cursor = ChoiceCursor()
            text, logprobs = self._echo(body, parents[index], cursor) if body.echo else ("", None)
            if not body.score_only:
                text += sample.text
                logprobs = self._merge(logprobs, self.logprobs(sample, cursor, len(sample.token_ids)))
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": sample.finish_reason}
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(parents[index])
            choices.append(choice)
        usage = generation.usage()
        if body.score_only:  # the one token sampled to run the prompt is not returned
            usage["completion_tokens"] = 0
            usage["total_tokens"] = usage["prompt_tokens"]
        return {**base, "object": "text_completion", "choices": choices, "usage": usage}
