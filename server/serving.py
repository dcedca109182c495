"""Serving logic of the OpenAI routes: validate, tokenize, run the engine, shape the response."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel
from vllm.exceptions import VLLMClientError

from server.engine import GenerationChunk, GenerationEngine
from server.errors import APIError, error_body
from server.facts_service import FactsService
from server.metrics import ServerMetrics
from server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)

logger = logging.getLogger(__name__)


def _sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


def _usage(prompts: list[list[int]], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(ids) for ids in prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


@dataclass
class Choice:
    """One engine request behind one choice of a response."""

    index: int
    prompt_ids: list[int]
    params: object  # vllm.SamplingParams
    request_id: str


def _choices(prompts: list[list[int]], params, n: int, request_id: str) -> list[Choice]:
    """`n` choices per prompt, indexed prompt-major as OpenAI does. Seeded sampling gives each
    choice its own seed (seed + choice), so that n seeded choices are not n copies."""
    choices = []
    for p, prompt_ids in enumerate(prompts):
        for k in range(n):
            index = p * n + k
            own = params
            if params.seed is not None and index:
                own = params.clone()
                own.seed = params.seed + index
            choices.append(Choice(index, prompt_ids, own, f"{request_id}-{index}"))
    return choices


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come; closing this closes them all (so that
    each choice's engine request is aborted when the client goes away)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
        for task in tasks:
            task.result()  # re-raise a failed choice's error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    """Chat and text completions against one engine."""

    def __init__(self, engine: GenerationEngine, metrics: ServerMetrics,
                 facts: FactsService | None = None):
        self.engine = engine
        self.metrics = metrics
        self.facts = facts
        self._special_ids = set(engine.tokenizer.all_special_ids)

    @property
    def _records_fired(self) -> bool:
        return self.facts is not None and self.facts.provenance_enabled

    async def _provenance(self, choice: Choice, output_ids: list[int]) -> list[str]:
        """Memorized facts whose experts fired while this finished choice was served: the
        engine's record (model/fired_log.py), with what it could not see recomputed here."""
        if not self._records_fired:
            return []
        # Nothing the client got depends on the last output token's own forward.
        before = len(choice.prompt_ids) + max(len(output_ids), 1) - 1
        record = await self.engine.take_fired(choice.request_id, before)
        if record is None or record["incomplete"]:
            source, unseen = "recomputed", choice.prompt_ids + output_ids[:-1]
        elif record["prompt_cached"]:
            source, unseen = "prompt_recomputed", choice.prompt_ids
        else:
            source, unseen = "engine", []
        self.metrics.provenance.labels(source).inc()
        owners = (await asyncio.to_thread(self.facts.fired_owners, unseen,
                                          len(choice.prompt_ids)) if unseen else set())
        return self.facts.fact_ids(owners | set(record["owners"] if record else ()))

    # ---- validation -------------------------------------------------------------------------

    def _check_request(self, request: SamplingFields) -> None:
        if not self.engine.ready:
            raise APIError("the model is still loading; retry shortly", 503)
        if request.model != self.engine.model_name:
            raise APIError(
                f"model '{request.model}' does not exist; this server serves "
                f"'{self.engine.model_name}'", 400, param="model", type_="model_not_found",
            )
        if unknown := request.unsupported_fields():
            raise APIError(f"unsupported field(s): {', '.join(unknown)}; see the README for the "
                           "OpenAI fields this server implements", 400, param=unknown[0])
        if request.stream_options is not None and not request.stream:
            raise APIError("stream_options needs stream: true", 400, param="stream_options")

    def _sampling_params(self, request: SamplingFields, prompts: list[list[int]],
                         prompt_param: str):
        longest = max(len(ids) for ids in prompts)
        room = self.engine.max_model_len - longest
        if room <= 0:
            raise APIError(
                f"the prompt is {longest} tokens; this model's context is "
                f"{self.engine.max_model_len} tokens", 400, param=prompt_param,
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise APIError(
                f"max_tokens={request.max_tokens} plus the prompt's {longest} tokens exceeds "
                f"the context of {self.engine.max_model_len} tokens", 400, param="max_tokens",
            )
        try:
            bias = request.logit_bias_ids(self.engine.vocab_size)
        except ValueError as exc:
            raise APIError(str(exc), 400, param="logit_bias") from None
        default = min(self.engine.settings.default_max_tokens, room)
        return request.to_sampling_params(default, logit_bias=bias)

    # ---- routes -----------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        self._check_request(request)
        if request.tools:
            raise APIError("tools are not supported: this backbone's chat template has no tool "
                           "syntax", 400, param="tools")
        if request.tool_choice not in (None, "none"):
            raise APIError("tool_choice needs tools, which this server does not support", 400,
                           param="tool_choice")
        if conflict := request.conflict():
            raise APIError(conflict[0], 400, param=conflict[1])
        messages = [m.template_message() for m in request.messages]
        prompt_ids = self.engine.chat_prompt_ids(messages)
        params = self._sampling_params(request, [prompt_ids], "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        choices = _choices([prompt_ids], params, request.n, request_id)
        if request.stream:
            return _ending_in_error_event(self._chat_stream(request, choices, request_id))
        finals = await self._run_all("chat", choices)
        answers = [ChatCompletionChoice(
            index=choice.index, message=AssistantMessage(content=final.text),
            finish_reason=final.finish_reason, logprobs=self._chat_logprobs(request, final),
            mome_facts=await self._provenance(choice, final.token_ids))
            for choice, final in zip(choices, finals)]
        return ChatCompletionResponse(
            id=request_id, model=self.engine.model_name, choices=answers,
            usage=_usage([prompt_ids], sum(f.completion_tokens for f in finals)),
            mome_facts=_union(a.mome_facts for a in answers),
        )

    async def completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        self._check_request(request)
        if request.stream and request.echo:
            raise APIError("echo is not supported with stream", 400, param="echo")
        if request.suffix:
            raise APIError("suffix is not supported: this backbone has no fill-in-the-middle",
                           400, param="suffix")
        if request.best_of not in (None, request.n):
            raise APIError("best_of other than n is not supported (vLLM's V1 engine has no "
                           "best-of selection)", 400, param="best_of")
        texts = request.prompts()
        prompts = [self.engine.completion_prompt_ids(p) for p in texts]
        if not all(prompts):  # e.g. only control characters: the engine refuses empty prompts
            raise APIError("the prompt has no tokens", 400, param="prompt")
        vocab = self.engine.vocab_size
        if any(token >= vocab for ids in prompts for token in ids):
            raise APIError(f"the prompt has a token id beyond the vocabulary ({vocab})", 400,
                           param="prompt")
        params = self._sampling_params(request, prompts, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        choices = _choices(prompts, params, request.n, request_id)
        if request.stream:
            return _ending_in_error_event(self._completion_stream(request, choices, request_id))
        finals = await self._run_all("completions", choices)
        answers = []
        for choice, final in zip(choices, finals):
            echoed = _prompt_text(texts[choice.index // request.n], self.engine.tokenizer) \
                if request.echo else ""
            answers.append(CompletionChoice(
                index=choice.index, text=echoed + final.text, finish_reason=final.finish_reason,
                logprobs=self._completion_logprobs(request, choice.prompt_ids, final),
                mome_facts=await self._provenance(choice, final.token_ids)))
        return CompletionResponse(
            id=request_id, model=self.engine.model_name, choices=answers,
            usage=_usage(prompts, sum(f.completion_tokens for f in finals)),
            mome_facts=_union(a.mome_facts for a in answers),
        )

    # ---- logprobs ---------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _in_text(self, token_ids: list[int]) -> list[int]:
        """Positions of the tokens the text shows (not e.g. the end-of-turn token)."""
        return [i for i, token in enumerate(token_ids) if token not in self._special_ids]

    def _chat_logprobs(self, request: ChatCompletionRequest,
                       chunk: GenerationChunk) -> ChatLogprobs | None:
        if not request.logprobs:
            return None

        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self._token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = []
        for i in self._in_text(chunk.token_ids):
            chosen = top(chunk.token_ids[i], chunk.token_logprobs[i])
            alternatives = [top(t, lp) for t, lp in chunk.top_logprobs[i]]
            content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    def _completion_logprobs(self, request: CompletionRequest, prompt_ids: list[int],
                             final: GenerationChunk) -> CompletionLogprobs | None:
        if request.logprobs is None:
            return None
        kept = self._in_text(final.token_ids)
        ids = [final.token_ids[i] for i in kept]
        values = [final.token_logprobs[i] for i in kept]
        tops: list[dict[str, float] | None] = [
            {self._token_text(t): lp for t, lp in final.top_logprobs[i]} for i in kept]
        if request.echo:
            ids = prompt_ids + ids
            values = list(final.prompt_logprobs or [None] * len(prompt_ids)) + values
            tops = [None] * len(prompt_ids) + tops
        tokens = [self._token_text(t) for t in ids]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops,
                                  text_offset=offsets)

    # ---- engine plumbing --------------------------------------------------------------------

    async def _run_all(self, route: str, choices: list[Choice]) -> list[GenerationChunk]:
        return list(await asyncio.gather(*(self._run_to_end(route, c) for c in choices)))

    async def _run_to_end(self, route: str, choice: Choice) -> GenerationChunk:
        final = None
        async for chunk in self._tracked(route, choice):
            final = chunk
        assert final is not None
        return final

    async def _tracked(self, route: str, choice: Choice) -> AsyncIterator[GenerationChunk]:
        """Run one choice, recording metrics; aborts it in the engine if the client goes away."""
        start = time.perf_counter()
        first = True
        last: GenerationChunk | None = None
        self.metrics.running.inc()
        try:
            async for chunk in self.engine.generate(choice.prompt_ids, choice.params,
                                                    choice.request_id, self._records_fired):
                if first:
                    self.metrics.time_to_first_token.labels(route).observe(time.perf_counter() - start)
                    first = False
                last = chunk
                yield chunk
        finally:
            self.metrics.running.dec()
            if last is None or last.finish_reason is None:
                await self.engine.abort(choice.request_id)
            self.metrics.prompt_tokens.inc(len(choice.prompt_ids))
            self.metrics.generation_tokens.inc(last.completion_tokens if last else 0)
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _indexed(self, route: str, choice: Choice):
        async for chunk in self._tracked(route, choice):
            yield choice, chunk

    def _streams(self, route: str, choices: list[Choice]):
        return _merged([self._indexed(route, choice) for choice in choices])

    async def _chat_stream(self, request, choices: list[Choice], request_id) -> AsyncIterator[str]:
        model = self.engine.model_name

        def chunk_of(index: int, delta: DeltaMessage, **fields) -> ChatCompletionChunk:
            choice = ChatCompletionStreamChoice(index=index, delta=delta, **fields)
            return ChatCompletionChunk(id=request_id, model=model, choices=[choice])

        for choice in choices:
            yield _sse(chunk_of(choice.index, DeltaMessage(role="assistant", content="")))
        outputs = {choice.index: [] for choice in choices}
        completion_tokens = 0
        async for choice, chunk in self._streams("chat", choices):
            outputs[choice.index] += chunk.token_ids
            logprobs = self._chat_logprobs(request, chunk)
            if chunk.finish_reason:
                completion_tokens += chunk.completion_tokens
                facts = await self._provenance(choice, outputs[choice.index])
                yield _sse(chunk_of(choice.index, DeltaMessage(content=chunk.text),
                                    finish_reason=chunk.finish_reason, logprobs=logprobs,
                                    mome_facts=facts))
            elif chunk.text or chunk.token_ids:
                yield _sse(chunk_of(choice.index, DeltaMessage(content=chunk.text),
                                    logprobs=logprobs))
        if _include_usage(request):
            usage = _usage([choices[0].prompt_ids], completion_tokens)
            yield _sse(ChatCompletionChunk(id=request_id, model=model, choices=[], usage=usage))
        yield _sse("[DONE]")

    async def _completion_stream(self, request, choices: list[Choice],
                                 request_id) -> AsyncIterator[str]:
        model = self.engine.model_name
        outputs = {choice.index: [] for choice in choices}
        completion_tokens = 0
        async for choice, chunk in self._streams("completions", choices):
            outputs[choice.index] += chunk.token_ids
            if not (chunk.text or chunk.finish_reason):
                continue
            answer = CompletionChoice(
                index=choice.index, text=chunk.text, finish_reason=chunk.finish_reason,
                logprobs=self._completion_logprobs(request, choice.prompt_ids, chunk))
            if chunk.finish_reason:
                completion_tokens += chunk.completion_tokens
                answer.mome_facts = await self._provenance(choice, outputs[choice.index])
            body = CompletionResponse(id=request_id, model=model, choices=[answer],
                                      mome_facts=answer.mome_facts or [])
            yield _sse(json.dumps(body.model_dump(exclude={"usage"})))
        if _include_usage(request):
            prompts = [choice.prompt_ids for choice in choices[::request.n]]
            body = CompletionResponse(id=request_id, model=model, choices=[],
                                      usage=_usage(prompts, completion_tokens))
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
    return request.stream_options is not None and request.stream_options.include_usage


def _prompt_text(prompt: str | list[int], tokenizer) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def _union(fact_lists) -> list[str]:
    return sorted({fact for facts in fact_lists for fact in facts or []})
