"""App factory: builds the app state once, loads the engine in the background, wires errors."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from model.backbone import resolve_model_dir
from server.api_router import router as openai_router
from server.deps import AppState
from server.engine import GenerationEngine
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.serving import OpenAIServing
from server.settings import ServerSettings

logger = logging.getLogger(__name__)


def build_state(settings: ServerSettings) -> AppState:
    model_dir = resolve_model_dir(settings.model)
    engine = GenerationEngine(settings, model_dir)
    metrics = ServerMetrics()
    return AppState(settings=settings, engine=engine, metrics=metrics,
                    serving=OpenAIServing(engine, metrics))


async def _load_engine(state: AppState) -> None:
    try:
        await asyncio.to_thread(state.engine.start)
    except Exception as exc:  # surfaced through /health rather than killing the process
        logger.exception("engine failed to start")
        state.load_error = f"engine failed to start: {exc}"


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = build_state(settings)
        app.state.mome = state
        loader = asyncio.create_task(_load_engine(state))
        try:
            yield
        finally:
            loader.cancel()
            state.engine.shutdown()

    app = FastAPI(title="mome", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai_router)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        state: AppState | None = getattr(request.app.state, "mome", None)
        if state is not None and request.url.path.startswith("/v1/"):
            state.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    return app
