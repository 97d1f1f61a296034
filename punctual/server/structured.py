"""The front end's side of structured output: request fields -> a StructuredOutput, and a check
that it compiles (same library, same options as the core) before the request is admitted, so an
invalid or unsupported schema, or one too slow to compile, is a 400 naming the problem."""
from __future__ import annotations

import asyncio

from punctual.server.errors import bad_request
from punctual.server.protocol import GenerationRequest
from punctual.structured.compiler import DEFAULT_TIMEOUT_S, GrammarCompiler, GrammarError
from punctual.structured.spec import StructuredOutput


def requested_structure(body: GenerationRequest) -> tuple[StructuredOutput | None, str | None]:
    """(the spec, the request field it came from), or (None, None) for free text."""
    fmt, extension = body.response_format, body.structured_outputs
    if extension is not None:
        if fmt is not None and fmt.type != "text":
            raise bad_request("give response_format or structured_outputs, not both", "structured_outputs")
        given = [(name, value) for name, value in (("json", extension.json_), ("regex", extension.regex),
                                                   ("choice", extension.choice), ("grammar", extension.grammar))
                 if value is not None]
        if len(given) != 1:
            raise bad_request("structured_outputs takes exactly one of json, regex, choice, grammar",
                              "structured_outputs")
        name, value = given[0]
        param = f"structured_outputs.{name}"
        if name == "json":
            return _schema(value, param), param
        if name == "choice":
            if not value or not all(value):
                raise bad_request("choice must be a non-empty list of non-empty strings", param)
            return StructuredOutput.choice(value), param
        if not value:
            raise bad_request(f"{name} is empty", param)
        return StructuredOutput(name, value), param
    if fmt is None or fmt.type == "text":
        return None, None
    if fmt.type == "json_object":
        return StructuredOutput("json_object"), "response_format"
    if fmt.json_schema is None:
        raise bad_request("response_format of type json_schema needs json_schema", "response_format.json_schema")
    if fmt.json_schema.schema_ is None:
        return StructuredOutput("json_object"), "response_format.json_schema"
    return _schema(fmt.json_schema.schema_, "response_format.json_schema.schema"), "response_format.json_schema.schema"


def _schema(value: dict | str, param: str) -> StructuredOutput:
    try:
        return StructuredOutput.json_schema(value)
    except ValueError as exc:  # a string that is not JSON
        raise bad_request(f"the JSON schema is not valid JSON: {exc}", param) from None


class GrammarValidator:
    """Compiles each new spec once in the front end (cached), off the event loop, with a timeout."""

    def __init__(self, engine, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.engine = engine
        self.timeout_s = timeout_s
        self._compiler: GrammarCompiler | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            info = self.engine.info
            self._compiler = GrammarCompiler(lambda: self.engine.tokenizer, info.vocab_size, tuple(info.eos_token_ids))
        return self._compiler

    async def check(self, spec: StructuredOutput, param: str) -> None:
        future = self.compiler.submit(spec)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except GrammarError as exc:
            raise bad_request(str(exc), param, "invalid_grammar") from None
        except TimeoutError:
            self.compiler.drop(spec)
            raise bad_request(f"the {spec.kind} grammar did not compile within {self.timeout_s:g} s", param,
                              "grammar_timeout") from None

