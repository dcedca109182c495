"""Fixtures for the model tests: the real backbone, a fitted router, facts from CounterFact."""

from __future__ import annotations

import json
import shutil
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


@pytest.fixture
def memorizer(reference, router_dir, tmp_path):
    """Memorizer(**train config) over a fresh store with the fitted router, attached to the
    reference model as the server attaches it (generation reads the store, turn-scoped)."""
    from model.config import TrainConfig
    from model.memorize import Memorizer
    from model.memory_runtime import load_memory

    def make(**train) -> Memorizer:
        shutil.copytree(router_dir, tmp_path / "router", dirs_exist_ok=True)
        memory = load_memory(tmp_path / "store", tmp_path / "router", MemoryConfig(),
                             reference.d_model)
        reference.attach(memory)
        return Memorizer(reference, memory, TrainConfig(**train))
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
