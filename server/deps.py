"""Typed dependencies: handlers reach the app state built once at start-up through these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.engine import GenerationEngine
from server.metrics import ServerMetrics
from server.serving import OpenAIServing
from server.settings import ServerSettings


@dataclass
class AppState:
    settings: ServerSettings
    engine: GenerationEngine
    metrics: ServerMetrics
    serving: OpenAIServing
    load_error: str | None = None
    extras: dict = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    return request.app.state.mome


StateDep = Annotated[AppState, Depends(get_state)]
