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


NonEmptyText = Annotated[str, StringConstraints(min_length=1)]


class RequestModel(BaseModel):
    """Base of every request body: text must be text."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        if (where := _lone_surrogate(data)) is not None:
            raise ValueError(f"{where}: not valid Unicode text (a lone UTF-16 surrogate)")
        return data


class OpenAIModel(RequestModel):
    # Unknown fields (logit_bias, user, ...) are accepted and ignored, as OpenAI clients send them.
    model_config = ConfigDict(extra="allow")


class SamplingFields(OpenAIModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: NonEmptyText | list[NonEmptyText] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    # Beyond OpenAI's spec (as in vLLM's server): keep generating past EOS, for benchmarks.
    ignore_eos: bool = False

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
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            **extra,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


class ChatMessage(OpenAIModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)  # in the schema, so clients see it


class CompletionRequest(SamplingFields):
    prompt: str = Field(min_length=1)
    # Legacy completions options: with `echo` the prompt is returned before the completion, and
    # with `logprobs` (0-5) each token's log-probability too (how perplexity is measured).
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def to_sampling_params(self, default_max_tokens: int, **extra):
        wants_prompt = self.echo and self.logprobs is not None
        return super().to_sampling_params(default_max_tokens, logprobs=self.logprobs,
                                          prompt_logprobs=0 if wants_prompt else None, **extra)



class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None


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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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
