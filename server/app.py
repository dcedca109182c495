"""App factory: builds the app state once, loads the engine in the background, wires errors."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from model.backbone import resolve_model_dir
from server.api_router import router as openai_router
from server.body_limit import BodyLimit
from server.deps import AppState
from server.engine import GenerationEngine
from server.errors import install_error_handlers
from server.facts_router import router as facts_router
from server.facts_service import FactsService
from server.memory_setup import admin_key, build_memorizer
from server.metrics import ServerMetrics
from server.serving import OpenAIServing
from server.settings import ServerSettings

logger = logging.getLogger(__name__)


def build_state(settings: ServerSettings) -> AppState:
    """Everything the app needs, built once: engine, memory, registry, worker."""
    model_dir = resolve_model_dir(settings.model)
    metrics = ServerMetrics()
    if not settings.memory:
        engine = GenerationEngine(settings, model_dir)
        return AppState(settings=settings, engine=engine, metrics=metrics,
                        serving=OpenAIServing(engine, metrics))
    memorizer, overrides, registry = build_memorizer(settings, model_dir)
    engine = GenerationEngine(settings, model_dir, memory_overrides=overrides)
    facts = FactsService(engine, memorizer, registry, max_len=settings.max_model_len,
                         batch_size=settings.train_batch_size, provenance=settings.provenance,
                         external_worker=settings.worker == "external")
    return AppState(settings=settings, engine=engine, metrics=metrics,
                    serving=OpenAIServing(engine, metrics, facts), facts=facts,
                    admin_key=admin_key(settings))


async def _load_engine(state: AppState) -> None:
    try:
        await asyncio.to_thread(state.engine.start)
        if state.facts is not None:
            await state.engine.bind_memory()
            await state.engine.refresh_memory()
            # Starts the worker thread, which recovers there (it publishes through this loop).
            state.facts.start(asyncio.get_running_loop())
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
            if state.facts is not None:  # the worker may wait on this loop: join it off it
                await asyncio.to_thread(state.facts.stop)
            state.engine.shutdown()

    app = FastAPI(title="mome", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(facts_router)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        state: AppState | None = getattr(request.app.state, "mome", None)
        if state is not None and request.url.path.startswith("/v1/"):
            # The route's template, never the raw path: random URLs must not grow new series.
            route = request.scope.get("route")
            label = route.path if route is not None else "unmatched"
            state.metrics.requests.labels(label, str(response.status_code)).inc()
        return response

    # Outermost: a body over the limit is refused before anything parses it.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    return app
