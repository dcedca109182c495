"""Pydantic models of the OpenAI-compatible API (the subset this server implements)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator


def _random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _lone_surrogate(value, path: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate ("\\ud800" is
    valid JSON but no text: tokenizers and UTF-8 encoders fail on it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}".strip("."))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if found := _lone_surrogate(item, f"{path}.{i}".strip(".")):
                return found
    return None


def _integral_floats_as_ints(value):
    """JSON Schema counts 5.0 as an integer, strict pydantic does not: give it 5 (a float
    field still takes an int)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return value


NonEmptyText = Annotated[str, StringConstraints(min_length=1)]


class RequestModel(BaseModel):
    """Base of every request body: text must be text, and every value has its schema's JSON
    type (strict: `"echo": 0` or `"n": "2"` is a 422, not coerced as the schema does not say)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        if (where := _lone_surrogate(data)) is not None:
            raise ValueError(f"{where}: not valid Unicode text (a lone UTF-16 surrogate)")
        return _integral_floats_as_ints(data)


class OpenAIModel(RequestModel):
    # Unknown fields are kept (not a 422 from pydantic) so that the server can refuse them with
    # a 400 naming the field (`unsupported_fields`): nothing a client sends is silently dropped.
    # The document says so: no other properties.
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    def unsupported_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


MAX_CHOICES = 16  # `n` per prompt: each choice is one engine request
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs


class StreamOptions(RequestModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def engine_seed(seed: int) -> int:
    """A seed as a signed 64-bit integer, the same one each time: the engine cannot carry a
    larger one to its process (a 500 before), and a bound near 2**63 in the schema is
    ambiguous to tools that read JSON numbers as doubles (the fuzz test's generator did)."""
    return (seed + 2**63) % 2**64 - 2**63


class SamplingFields(OpenAIModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: NonEmptyText | list[NonEmptyText] | None = None
    seed: int | None = None  # any integer; the engine gets its 64-bit image (engine_seed)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Token id (as a string, as OpenAI sends it) -> bias added to its logit.
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # Metadata with no effect on generation (OpenAI uses it for abuse monitoring).
    user: str | None = None
    # Beyond OpenAI's spec (as in vLLM's server): keep generating past EOS, for benchmarks.
    ignore_eos: bool = False

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float] | None:
        """`logit_bias` with integer token ids; ValueError names a key that is no token id."""
        if not self.logit_bias:
            return None
        biases = {}
        for key, bias in self.logit_bias.items():
            if not (key.isdigit() and int(key) < vocab_size):
                raise ValueError(f"logit_bias: '{key}' is not a token id (0..{vocab_size - 1})")
            biases[int(key)] = bias
        return biases

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling_params(self, default_max_tokens: int, **extra):
        """Engine parameters for this request; greedy when temperature is 0."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=1.0 if self.temperature == 0 else self.top_p,
            stop=self.stop_list() or None,
            seed=None if self.seed is None else engine_seed(self.seed),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            **extra,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


class TextPart(RequestModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    # "developer" is OpenAI's newer name for "system"; `name` is accepted, as OpenAI does, but
    # this model's chat template has no place for it.
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class JSONSchemaFormat(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` shadows a pydantic BaseModel attribute, hence the alias.
    json_schema: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None  # needed with type json_schema (a 400 without)

    def structured_outputs(self):
        """vLLM's structured-output constraint for this format (None for plain text)."""
        from vllm.sampling_params import StructuredOutputsParams

        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            return StructuredOutputsParams(json=self.json_schema.json_schema)
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)  # in the schema, so clients see it
    # OpenAI's newer name for max_tokens; either may be given (the same value if both).
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # Declared so that they are refused with a reason (this backbone's chat template has no
    # tool syntax), not as unknown fields.
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _max_completion_tokens_is_max_tokens(self):
        # Conflicts between fields the schema cannot state are 400s (`conflict`), not 422s.
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def conflict(self) -> tuple[str, str] | None:
        """(message, field) of a combination of fields the server refuses."""
        if self.max_completion_tokens not in (None, self.max_tokens):
            return "max_tokens and max_completion_tokens differ; give one", "max_tokens"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs: true", "top_logprobs"
        form = self.response_format
        if form is not None and form.type == "json_schema" and form.json_schema is None:
            return "response_format of type json_schema needs `json_schema`", "response_format"
        return None

    def to_sampling_params(self, default_max_tokens: int, **extra):
        top = self.top_logprobs or 0
        structured = self.response_format.structured_outputs() if self.response_format else None
        return super().to_sampling_params(default_max_tokens,
                                          logprobs=top if self.logprobs else None,
                                          structured_outputs=structured, **extra)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# A string, a list of strings, a list of token ids, or a list of token-id lists (OpenAI's
# four forms): one prompt, or several, each getting its own `n` choices.
PromptInput = NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | TokenIds | \
    Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    # Legacy completions options: with `echo` the prompt is returned before the completion, and
    # with `logprobs` (0-5) each token's log-probability too (how perplexity is measured).
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # Declared so that they are refused with a reason: no fill-in-the-middle in this backbone,
    # and vLLM's V1 engine has no best-of selection (best_of equal to n is plain sampling).
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def to_sampling_params(self, default_max_tokens: int, **extra):
        wants_prompt = self.echo and self.logprobs is not None
        return super().to_sampling_params(default_max_tokens, logprobs=self.logprobs,
                                          prompt_logprobs=0 if wants_prompt else None, **extra)



class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    # Beyond OpenAI's spec: ids of the memorized facts whose experts fired for this choice.
    mome_facts: list[str] = Field(default_factory=list)


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    # Beyond OpenAI's spec: ids of the memorized facts whose experts fired for this answer.
    mome_facts: list[str] = Field(default_factory=list)


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    # Beyond OpenAI's spec: on the choice's last chunk, the facts whose experts fired.
    mome_facts: list[str] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    # Beyond OpenAI's spec: on the final chunk, the memorized facts whose experts fired.
    mome_facts: list[str] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (nothing predicts it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    # Beyond OpenAI's spec: ids of the memorized facts whose experts fired for this choice.
    mome_facts: list[str] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    # Beyond OpenAI's spec: ids of the memorized facts whose experts fired for this answer.
    mome_facts: list[str] = Field(default_factory=list)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mome"
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
