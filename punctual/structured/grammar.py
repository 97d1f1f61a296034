"""A StructuredOutput -> llguidance grammar text (what LLMatcher takes).

JSON is generated compact (no free whitespace, ", " and ": " separators as json.dumps writes
them): free whitespace lets a weak model pad forever instead of closing the object.
"""
from __future__ import annotations

import json

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from punctual.structured.spec import StructuredOutput

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def compact_schema(schema: dict | bool) -> dict | bool:
    """The schema with llguidance's JSON options set in it (for %json blocks inside Lark)."""
    if isinstance(schema, bool):
        return schema
    return {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


def to_grammar(spec: StructuredOutput) -> str:
    """Raises ValueError when the spec cannot be written as a grammar (invalid JSON, say);
    whether the grammar itself is valid is the compiler's question."""
    if spec.kind == "json":
        schema = json.loads(spec.value)
        if not isinstance(schema, (dict, bool)):
            raise ValueError("the JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        options = json.loads(spec.value)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        alternatives = " | ".join(json.dumps(o, ensure_ascii=False) for o in dict.fromkeys(options))
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    if spec.kind == "grammar":
        # Lark as it is; GBNF (llama.cpp's, xgrammar's EBNF) converted to Lark by llguidance.
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.value))
    raise ValueError(f"unknown structured output kind {spec.kind!r}")
