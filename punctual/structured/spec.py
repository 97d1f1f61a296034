"""What a request asks its output to match. Pure Python (no torch, no llguidance): it rides in
SamplingParams to the core, so the scheduler and the simulator can carry it unchanged."""
from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """kind: json (value: the schema as compact JSON text, keys in the caller's order), json_object (any object), regex,
    choice (value: a JSON list of strings), grammar (a Lark grammar, or GBNF which is converted).

    Frozen and text-valued, so it hashes: the compile cache is keyed by it."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.value, str):
            raise ValueError(f"structured output value must be text, got {type(self.value).__name__}")

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> "StructuredOutput":
        if isinstance(schema, str):
            schema = json.loads(schema)
        # Not sort_keys: the order of `properties` is the order the output's keys are generated in
        # (a schema that puts "reasoning" before "answer" wants the reasoning written first), so
        # schemas that differ only in key order are different grammars, and so cache keys.
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, options: list[str]) -> "StructuredOutput":
        return cls("choice", json.dumps(list(options)))
