"""POST /tokenize and POST /detokenize, in vLLM's request and response shapes.

Front-end work only: the tokenizer lives in this process, so neither route touches the core.
"""
from __future__ import annotations

from punctual.server.async_engine import AsyncEngine
from punctual.server.chat import chat_prompt
from punctual.server.errors import bad_request
from punctual.server.protocol import DetokenizeRequest, TokenizeRequest


def tokenize(engine: AsyncEngine, body: TokenizeRequest) -> dict:
    tokenizer = engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages is empty: give at least one message", "messages")
        _, tokens = chat_prompt(tokenizer, body.messages, body.add_generation_prompt,
                                add_special_tokens=bool(body.add_special_tokens))
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = tokenizer.encode(body.prompt, add_special_tokens=add_special)
    response = {"count": len(tokens), "max_model_len": engine.info.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        response["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
    return response


def detokenize(engine: AsyncEngine, body: DetokenizeRequest) -> dict:
    vocab_size = engine.info.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"tokens must be integers in [0, {vocab_size}), got {bad}", "tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}
