"""OpenAI request schemas (what clients send), plus Punctual's extension fields.

Pydantic checks types here (strict: a string is not a number); value ranges are checked once,
by SamplingParams, whose errors name the field. A field Punctual does not implement is a 400
naming it (extra="forbid"), not silently dropped, unless it is in IGNORED_FIELDS: OpenAI fields
accepted and ignored because ignoring them cannot change the output, each with its reason.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from punctual.sampling_params import SamplingParams


# Accepted and ignored, on chat and completions: OpenAI fields whose effect is outside the
# output (storage, billing, OpenAI's own routing and abuse tracking) or only on latency. The
# README lists the same table. Every other field Punctual does not implement is refused.
IGNORED_FIELDS: dict[str, str] = {
    "store": "OpenAI keeps the completion for its dashboard and evals; Punctual stores nothing, "
             "and the response is the same either way",
    "metadata": "tags on a stored completion (see store): nothing is stored",
    "service_tier": "OpenAI's billing and capacity class; Punctual has one tier (its `priority` "
                    "field orders requests)",
    "prompt_cache_key": "a routing hint OpenAI uses to raise prefix-cache hits; Punctual's prefix "
                        "cache and router match prompts by their tokens; a cache changes latency, never output",
    "prompt_cache_retention": "how long OpenAI keeps a cached prefix: latency only, never output",
    "safety_identifier": "an end-user id for OpenAI's abuse detection; never changes the output "
                         "(`user` is the field Punctual uses, for fairness)",
    "prediction": "Predicted Outputs: known text to speed decoding up; the output is the same with "
                  "or without it",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    # OpenAI pads streamed chunks against a length side channel unless this is false; Punctual
    # never pads, so false is honoured and true (a client asking for the mitigation) is refused.
    include_obfuscation: bool = False

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool) -> bool:
        if value:
            raise ValueError("Punctual does not obfuscate streams; leave it out or set it to false")
        return value


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True, extra="forbid")
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM's structured_outputs extension: exactly one of json, regex, choice, grammar."""

    model_config = ConfigDict(strict=True, populate_by_name=True, extra="forbid")
    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class GenerationRequest(BaseModel):
    """Fields both /v1/completions and /v1/chat/completions take."""

    # forbid: a field Punctual does not implement is a 400 naming it, not a silent no-op. Nested
    # option objects forbid too; messages do not (SDKs echo earlier answers back with their extras).
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    # None: not given, so the checkpoint's generation_config.json default applies, then OpenAI's.
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # OpenAI's: token id (a string key in JSON) -> bias in [-100, 100] added to its logit.
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names), ignored by plain OpenAI clients.
    ignore_eos: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Latency SLOs and priority, carried to the scheduler; server flags give the defaults.
    ttft_slo_ms: float | None = Field(default=None, gt=0)
    tpot_slo_ms: float | None = Field(default=None, gt=0)
    priority: int = 0
    # Structured output: OpenAI's response_format, or vLLM's structured_outputs.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's extension: logprobs of the prompt's tokens, with this many top alternatives each.
    prompt_logprobs: int | None = None
    # vLLM's extension: only requests with the same salt share prefix-cache blocks (a server that
    # isolates by API key or user replaces it with the tenant's).
    cache_salt: str | None = Field(default=None, min_length=1)
    # Punctual's extension: sparse decode attention (Quest) for this request; None: the server's
    # setting. true on a server started without --sparse-attention is a 400.
    sparse_attention: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored_fields(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in IGNORED_FIELDS}
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return None

    def requested_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        """Raises ValueError naming the field when a value is out of range.

        `defaults` are the checkpoint's (generation_config.json); they fill the fields this request
        left out, and OpenAI's defaults fill the rest.
        """
        defaults = defaults or {}

        def pick(name: str, fallback: float | int) -> float | int:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            n=self.n, max_tokens=self.requested_max_tokens(),
            temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", -1),
            min_p=pick("min_p", 0.0), seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            logprobs=self.requested_logprobs(), repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, min_tokens=self.min_tokens,
            prompt_logprobs=self.requested_prompt_logprobs(), logit_bias=self.token_logit_bias(),
            sparse_attention=self.sparse_attention)

    def token_logit_bias(self) -> dict[int, float] | None:
        """logit_bias with its JSON string keys as token ids; ValueError naming the field for a key
        that is not an integer (ranges and the vocabulary are checked after)."""
        if self.logit_bias is None:
            return None
        for key in self.logit_bias:
            if not re.fullmatch(r"0|[1-9][0-9]*", key):  # canonical only: "05" and "5" would be one token
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
        return {int(key): value for key, value in self.logit_bias.items()}


class CompletionRequest(GenerationRequest):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    # OpenAI's best_of (generate best_of, return the n most likely): only best_of == n, which
    # returns the same samples as leaving it out, is taken; anything else is a 400.
    best_of: int | None = None

    @property
    def score_only(self) -> bool:
        """echo with max_tokens 0: score the prompt, generate nothing (how evaluation harnesses
        compute a loglikelihood). The engine still samples one token, which is not returned."""
        return self.echo and self.max_tokens == 0

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(f"best_of other than n is not supported (got best_of {best_of}, n {n})")
        return best_of

    def requested_max_tokens(self) -> int | None:
        if self.score_only:
            return 1
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        # echo with logprobs returns the prompt's logprobs too, with the same number of alternatives.
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    arguments: str  # JSON text


class MessageToolCall(BaseModel):
    model_config = ConfigDict(strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # extension, as in vLLM
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    # OpenAI's output modalities: text is the only one Punctual produces; ["audio"] is refused.
    modalities: list[Literal["text"]] | None = None

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens replaces the deprecated max_tokens; None: up to the context window.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return 0 if self.top_logprobs is None else self.top_logprobs


class PinRequest(BaseModel):
    """POST /v1/cache/pin: keep a prefix's KV cached (Prompt Cache's prompt modules)."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    pin_id: str | None = None  # default: a new id, returned
    # The pinned blocks serve requests with this salt (as a generation request's cache_salt; the
    # server's isolation, by API key or by `user`, overrides it the same way).
    cache_salt: str | None = Field(default=None, min_length=1)
    user: str | None = None


class UnpinRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    pin_id: str


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` through the chat template."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    # None: True for a prompt (BOS where the tokenizer adds one), False for messages (the template wrote them).
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape)."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's): serve the PEFT adapter at `lora_path` as model `lora_name`."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # accepted for vLLM's clients; the name decides
