"""Fixtures for the model tests: the real backbone, a fitted router, facts from CounterFact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.backbone import pull_default_model
from model.config import MemoryConfig
from model.reference import ReferenceModel

DATA = Path(__file__).resolve().parents[1] / "data" / "counterfact-slice.jsonl"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return pull_default_model()


@pytest.fixture(scope="session")
def reference(model_dir) -> ReferenceModel:
    return ReferenceModel(model_dir, MemoryConfig().layer)


@pytest.fixture(scope="session")
def router_dir(model_dir, reference) -> Path:
    from server.memory_setup import ensure_router

    cfg = MemoryConfig()
    return ensure_router(model_dir, reference, cfg.layer, cfg.d_k)


@pytest.fixture(scope="session")
def counterfact() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()[200:260]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
