"""Serving logic of the OpenAI routes: validate, tokenize, run the engine, shape the response."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel
from vllm.exceptions import VLLMClientError

from server.engine import GenerationChunk, GenerationEngine
from server.errors import APIError, error_body
from server.facts_service import FactsService
from server.metrics import ServerMetrics
from server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingFields,
    UsageInfo,
)

logger = logging.getLogger(__name__)


def _sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


def _usage(chunk: GenerationChunk | None, prompt_tokens: int) -> UsageInfo:
    completion_tokens = chunk.completion_tokens if chunk else 0
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class OpenAIServing:
    """Chat and text completions against one engine."""

    def __init__(self, engine: GenerationEngine, metrics: ServerMetrics,
                 facts: FactsService | None = None):
        self.engine = engine
        self.metrics = metrics
        self.facts = facts

    async def _provenance(self, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
        """Memorized facts whose experts fired on this prompt and answer."""
        if self.facts is None:
            return []
        return await asyncio.to_thread(self.facts.provenance, prompt_ids + output_ids)

    # ---- validation -------------------------------------------------------------------------

    def _check_ready_and_model(self, request: SamplingFields) -> None:
        if not self.engine.ready:
            raise APIError("the model is still loading; retry shortly", 503)
        if request.model != self.engine.model_name:
            raise APIError(
                f"model '{request.model}' does not exist; this server serves "
                f"'{self.engine.model_name}'", 400, param="model", type_="model_not_found",
            )

    def _sampling_params(self, request: SamplingFields, prompt_len: int, prompt_param: str):
        room = self.engine.max_model_len - prompt_len
        if room <= 0:
            raise APIError(
                f"the prompt is {prompt_len} tokens; this model's context is "
                f"{self.engine.max_model_len} tokens", 400, param=prompt_param,
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise APIError(
                f"max_tokens={request.max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                f"the context of {self.engine.max_model_len} tokens", 400, param="max_tokens",
            )
        default = min(self.engine.settings.default_max_tokens, room)
        return request.to_sampling_params(default)

    # ---- routes -----------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        self._check_ready_and_model(request)
        messages = [m.model_dump(include={"role", "content"}) for m in request.messages]
        prompt_ids = self.engine.chat_prompt_ids(messages)
        params = self._sampling_params(request, len(prompt_ids), "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if request.stream:
            return _ending_in_error_event(self._chat_stream(request, prompt_ids, params,
                                                            request_id))
        final = await self._run_to_end("chat", prompt_ids, params, request_id)
        return ChatCompletionResponse(
            id=request_id, model=self.engine.model_name,
            choices=[ChatCompletionChoice(
                message=ChatMessage(role="assistant", content=final.text),
                finish_reason=final.finish_reason)],
            usage=_usage(final, len(prompt_ids)),
            mome_facts=await self._provenance(prompt_ids, final.token_ids),
        )

    async def completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        self._check_ready_and_model(request)
        if request.stream and request.echo:
            raise APIError("echo is not supported with stream", 400, param="echo")
        prompt_ids = self.engine.completion_prompt_ids(request.prompt)
        if not prompt_ids:  # e.g. only control characters: the engine refuses empty prompts
            raise APIError("the prompt has no tokens", 400, param="prompt")
        params = self._sampling_params(request, len(prompt_ids), "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if request.stream:
            return _ending_in_error_event(self._completion_stream(request, prompt_ids, params,
                                                                  request_id))
        final = await self._run_to_end("completions", prompt_ids, params, request_id)
        choice = CompletionChoice(text=(request.prompt if request.echo else "") + final.text,
                                  finish_reason=final.finish_reason,
                                  logprobs=self._logprobs(request, prompt_ids, final))
        return CompletionResponse(
            id=request_id, model=self.engine.model_name,
            choices=[choice],
            usage=_usage(final, len(prompt_ids)),
            mome_facts=await self._provenance(prompt_ids, final.token_ids),
        )

    def _logprobs(self, request: CompletionRequest, prompt_ids: list[int],
                  final: GenerationChunk) -> CompletionLogprobs | None:
        if request.logprobs is None:
            return None
        ids, values = list(final.token_ids), list(final.token_logprobs or [])
        if request.echo:
            ids, values = prompt_ids + ids, list(final.prompt_logprobs or []) + values
        tokens = self.engine.tokenizer.convert_ids_to_tokens(ids)
        return CompletionLogprobs(tokens=tokens, token_logprobs=values)

    # ---- engine plumbing --------------------------------------------------------------------

    async def _run_to_end(self, route: str, prompt_ids, params, request_id) -> GenerationChunk:
        final = None
        async for chunk in self._tracked(route, prompt_ids, params, request_id):
            final = chunk
        assert final is not None
        return final

    async def _tracked(self, route: str, prompt_ids, params, request_id) -> AsyncIterator[GenerationChunk]:
        """Run one request, recording metrics; aborts it in the engine if the client goes away."""
        start = time.perf_counter()
        first = True
        last: GenerationChunk | None = None
        self.metrics.running.inc()
        try:
            async for chunk in self.engine.generate(prompt_ids, params, request_id):
                if first:
                    self.metrics.time_to_first_token.labels(route).observe(time.perf_counter() - start)
                    first = False
                last = chunk
                yield chunk
        finally:
            self.metrics.running.dec()
            if last is None or last.finish_reason is None:
                await self.engine.abort(request_id)
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            self.metrics.generation_tokens.inc(last.completion_tokens if last else 0)
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _chat_stream(self, request, prompt_ids, params, request_id) -> AsyncIterator[str]:
        model = self.engine.model_name

        def chunk_of(delta: DeltaMessage, finish: str | None = None) -> ChatCompletionChunk:
            choice = ChatCompletionStreamChoice(delta=delta, finish_reason=finish)
            return ChatCompletionChunk(id=request_id, model=model, choices=[choice])

        yield _sse(chunk_of(DeltaMessage(role="assistant", content="")))
        last, output_ids = None, []
        async for chunk in self._tracked("chat", prompt_ids, params, request_id):
            last = chunk
            output_ids += chunk.token_ids
            if chunk.finish_reason:
                final = chunk_of(DeltaMessage(content=chunk.text), chunk.finish_reason)
                final.mome_facts = await self._provenance(prompt_ids, output_ids)
                yield _sse(final)
            elif chunk.text:
                yield _sse(chunk_of(DeltaMessage(content=chunk.text)))
        if _include_usage(request):
            usage_chunk = ChatCompletionChunk(id=request_id, model=model, choices=[],
                                              usage=_usage(last, len(prompt_ids)))
            yield _sse(usage_chunk)
        yield _sse("[DONE]")

    async def _completion_stream(self, request, prompt_ids, params, request_id) -> AsyncIterator[str]:
        model = self.engine.model_name
        last, output_ids = None, []
        async for chunk in self._tracked("completions", prompt_ids, params, request_id):
            last = chunk
            output_ids += chunk.token_ids
            if chunk.text or chunk.finish_reason:
                body = CompletionResponse(
                    id=request_id, model=model,
                    choices=[CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason)])
                if chunk.finish_reason:
                    body.mome_facts = await self._provenance(prompt_ids, output_ids)
                yield _sse(json.dumps(body.model_dump(exclude={"usage"})))
        if _include_usage(request):
            body = CompletionResponse(id=request_id, model=model, choices=[],
                                      usage=_usage(last, len(prompt_ids)))
            yield _sse(body)
        yield _sse("[DONE]")


async def _ending_in_error_event(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that fails after its 200 went out ends with an error event and [DONE], as
    vLLM's server does, instead of a connection cut mid-body."""
    try:
        async for event in stream:
            yield event
    except VLLMClientError as exc:
        yield _sse(json.dumps(error_body(str(exc), 400, getattr(exc, "parameter", None))))
        yield _sse("[DONE]")
    except Exception as exc:
        logger.exception("stream failed")
        yield _sse(json.dumps(error_body(f"internal error ({type(exc).__name__})", 500)))
        yield _sse("[DONE]")


def _include_usage(request: SamplingFields) -> bool:
    options = getattr(request, "stream_options", None) or {}
    return bool(options.get("include_usage")) if isinstance(options, dict) else False
