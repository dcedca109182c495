"""Typed dependencies: handlers reach the app state built once at start-up through these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.engine import GenerationEngine
from server.facts_service import FactsService
from server.metrics import ServerMetrics
from server.serving import OpenAIServing
from server.settings import ServerSettings


@dataclass
class AppState:
    settings: ServerSettings
    engine: GenerationEngine
    metrics: ServerMetrics
    serving: OpenAIServing
    facts: FactsService | None = None  # None when serving without memory experts
    admin_key: str = ""
    load_error: str | None = None


def get_state(request: Request) -> AppState:
    return request.app.state.mome


StateDep = Annotated[AppState, Depends(get_state)]
