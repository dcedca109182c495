"""OpenAI-compatible routes: thin wrappers over `OpenAIServing`."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import StateDep
from server.errors import error_body
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)

router = APIRouter()


def _respond(result):
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return result


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, state: StateDep):
    return _respond(await state.serving.chat(request))


@router.post("/v1/completions")
async def completions(request: CompletionRequest, state: StateDep):
    return _respond(await state.serving.completion(request))


@router.get("/v1/models")
async def list_models(state: StateDep) -> ModelList:
    engine = state.engine
    return ModelList(data=[ModelCard(id=engine.model_name, root=str(engine.model_dir))])


@router.get("/health")
async def health(state: StateDep):
    if state.engine.ready:
        return {"status": "ok"}
    message = state.load_error or "the model is still loading"
    return JSONResponse(error_body(message, 503), status_code=503)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
