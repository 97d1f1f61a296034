"""llguidance vs xgrammar on builtin's 49,152-token tokenizer: compile time and per-token mask time.

    python benchmarks/bench_grammar.py [--tokens 200] [--repeats 3]

Compile: per schema, cold (a fresh compiler / matcher, nothing cached) and cached (the same
schema again: xgrammar's compiler cache; for llguidance a deep copy of a matcher built once,
which is what punctual.structured caches). Mask: walk each grammar for up to --tokens steps,
drawing a random allowed token each step (seeded), timing only the mask computation into a
preallocated bitmask. Medians and p99 over all steps of all schemas.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from punctual.checkpoints.builtin import builtin_path
from punctual.tokenizer import load_tokenizer

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"], "additionalProperties": False},
    "enum_array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 5},
        "score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["tags", "score"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"},
                                                  "address": {"type": "object", "properties": {
                                                      "street": {"type": "string"}, "zip": {"type": "string",
                                                                                            "pattern": "^[0-9]{5}$"}},
                                                      "required": ["street", "zip"]}},
                 "required": ["id", "email", "address"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}}},
        "required": ["user", "items"]},
    "one_of": {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
         "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"},
                                          "h": {"type": "number"}}, "required": ["kind", "w", "h"]},
        {"type": "object", "properties": {"kind": {"const": "poly"}, "points": {"type": "array", "items": {
            "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}}},
         "required": ["kind", "points"]}]}}, "required": ["shape"]},
    "tool_call": {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city"]}}, "required": ["name", "arguments"]},
    "string_formats": {"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"}, "uuid": {"type": "string", "format": "uuid"},
        "note": {"type": "string", "maxLength": 40}}, "required": ["when", "uuid", "note"]},
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero()[:, 0].tolist()


def bench_llguidance(hf_tok, vocab: int, steps: int, repeats: int, rng: random.Random) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
    tokenizer_s = time.perf_counter() - t
    cold, cached, masks = [], [], []
    bitmask = lt.allocate_token_bitmask(1, vocab)
    for _ in range(repeats):
        for schema in SCHEMAS.values():
            t = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
            matcher = llguidance.LLMatcher(tok, grammar)
            lt.fill_next_token_bitmask(matcher, bitmask, 0)  # the first mask builds the lexer lazily
            cold.append(time.perf_counter() - t)
            assert not matcher.is_error(), matcher.get_error()
            t = time.perf_counter()
            copy = matcher.deep_copy()
            lt.fill_next_token_bitmask(copy, bitmask, 0)
            cached.append(time.perf_counter() - t)
            for _ in range(steps):
                if copy.is_stopped():
                    break
                t = time.perf_counter()
                lt.fill_next_token_bitmask(copy, bitmask, 0)
                masks.append(time.perf_counter() - t)
                options = allowed(bitmask[0], vocab)
                if not options:
                    break
                copy.consume_token(rng.choice(options))
    return dict(tokenizer_s=tokenizer_s, cold=cold, cached=cached, masks=masks)


def bench_xgrammar(hf_tok, vocab: int, steps: int, repeats: int, rng: random.Random) -> dict:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
    tokenizer_s = time.perf_counter() - t
    cold, cached, masks = [], [], []
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for _ in range(repeats):
        compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        for schema in SCHEMAS.values():
            text = json.dumps(schema)
            t = time.perf_counter()
            matcher = xgr.GrammarMatcher(compiler.compile_json_schema(text))
            matcher.fill_next_token_bitmask(bitmask, 0)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            matcher = xgr.GrammarMatcher(compiler.compile_json_schema(text))
            matcher.fill_next_token_bitmask(bitmask, 0)
            cached.append(time.perf_counter() - t)
            for _ in range(steps):
                if matcher.is_terminated():
                    break
                t = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask, 0)
                masks.append(time.perf_counter() - t)
                options = allowed(bitmask[0], vocab)
                if not options:
                    break
                matcher.accept_token(rng.choice(options))
    return dict(tokenizer_s=tokenizer_s, cold=cold, cached=cached, masks=masks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_tok = load_tokenizer(builtin_path("builtin"))
    vocab = len(hf_tok)
    print(f"vocabulary {vocab}, {len(SCHEMAS)} schemas x {args.repeats} repeats, up to {args.tokens} tokens each")
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        r = fn(hf_tok, vocab, args.tokens, args.repeats, random.Random(0))
        ms = lambda xs, q: pct(xs, q) * 1000  # noqa: E731
        print(f"{name:10s} tokenizer {r['tokenizer_s'] * 1000:7.1f} ms | compile cold p50 {ms(r['cold'], .5):7.2f} "
              f"p99 {ms(r['cold'], .99):7.2f} ms | cached p50 {ms(r['cached'], .5):6.3f} p99 {ms(r['cached'], .99):6.3f}"
              f" ms | mask p50 {statistics.median(r['masks']) * 1e6:6.1f} p99 {pct(r['masks'], .99) * 1e6:7.1f} us"
              f" ({len(r['masks'])} masks)")


if __name__ == "__main__":
    main()
