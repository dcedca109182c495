"""OpenAI-compatible routes: thin wrappers over `OpenAIServing`."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import StateDep
from server.errors import error_body, error_responses
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(responses=error_responses(413))  # the body limit guards every route


def _generation_responses(model: type, chunk: str) -> dict:
    """200 as JSON, or as server-sent events with `stream`, and the errors a generation has."""
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
             "description": f"`data` is one {chunk} as JSON, an error object if the engine "
                            "fails mid-stream, and last `[DONE]`"}
    return {200: {"model": model, "description": "The completion (JSON), or its chunks as "
                                                 "server-sent events with `stream: true`",
                  "content": {"text/event-stream": {"schema": event}}},
            **error_responses(400, 422, 503)}


def _respond(result):
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return result


@router.post("/v1/chat/completions",
             responses=_generation_responses(ChatCompletionResponse, "ChatCompletionChunk"))
async def chat_completions(request: ChatCompletionRequest, state: StateDep):
    return _respond(await state.serving.chat(request))


@router.post("/v1/completions",
             responses=_generation_responses(CompletionResponse, "CompletionResponse"))
async def completions(request: CompletionRequest, state: StateDep):
    return _respond(await state.serving.completion(request))


@router.get("/v1/models")
async def list_models(state: StateDep) -> ModelList:
    engine = state.engine
    return ModelList(data=[ModelCard(id=engine.model_name, root=str(engine.model_dir))])


@router.get("/health", responses=error_responses(503))
async def health(state: StateDep):
    if state.engine.ready:
        return {"status": "ok"}
    message = state.load_error or "the model is still loading"
    return JSONResponse(error_body(message, 503), status_code=503)


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus metrics", "content": {CONTENT_TYPE_LATEST: {"schema": {
        "type": "string"}}}}})
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
