"""Build the memory layer from its on-disk parts (router + expert store), in any process."""

from __future__ import annotations

from pathlib import Path

import torch

from expert_store.config import IndexConfig, StoreConfig
from expert_store.store import ExpertStore
from model.config import MemoryConfig
from model.memory_layer import MemoryLayer
from model.router import Router


def open_store(store_dir: Path, cfg: MemoryConfig, d_model: int) -> ExpertStore:
    """The fact store: one value vector of the backbone's width per expert, searched with the
    index the memory configuration asks for."""
    return ExpertStore.open(store_dir, StoreConfig(d_k=cfg.d_k, value_shape=(d_model,)),
                            index=IndexConfig(kind=cfg.index, ivf_nprobe=cfg.index_nprobe))


def load_memory(store_dir: Path, router_dir: Path, cfg: MemoryConfig, d_model: int,
                device: str | torch.device = "cpu", turn_marker=None) -> MemoryLayer:
    router = Router.load(router_dir)
    if router.d_k != cfg.d_k:
        raise ValueError(f"router at {router_dir} has d_k={router.d_k}, config asks {cfg.d_k}")
    store = open_store(store_dir, cfg, d_model)
    if router.completion_relation is None and store.read_relation_maps(store.allocated_ids()).any():
        raise ValueError(f"the store at {store_dir} has second keys taken through a completion "
                         f"relation map that the router at {router_dir} lacks: give the store "
                         f"back the router it was made with")
    return MemoryLayer(cfg, router, store, device=device, turn_marker=turn_marker)
