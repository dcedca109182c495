"""Build the memory layer from its on-disk parts (router + expert store), in any process."""

from __future__ import annotations

from pathlib import Path

import torch

from expert_store.config import StoreConfig
from expert_store.store import ExpertStore
from model.config import MemoryConfig
from model.memory_layer import MemoryLayer
from model.router import Router


def open_store(store_dir: Path, cfg: MemoryConfig, d_model: int) -> ExpertStore:
    """The fact store: one value vector of the backbone's width per expert."""
    return ExpertStore.open(store_dir, StoreConfig(d_k=cfg.d_k, value_shape=(d_model,)))


def load_memory(store_dir: Path, router_dir: Path, cfg: MemoryConfig, d_model: int,
                device: str | torch.device = "cpu", turn_marker=None) -> MemoryLayer:
    router = Router.load(router_dir)
    if router.d_k != cfg.d_k:
        raise ValueError(f"router at {router_dir} has d_k={router.d_k}, config asks {cfg.d_k}")
    return MemoryLayer(cfg, router, open_store(store_dir, cfg, d_model), device=device,
                       turn_marker=turn_marker)
