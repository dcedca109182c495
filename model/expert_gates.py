"""Per-expert gates, kept apart from their neighbours.

The serving path has one global gate: an expert fires where cos(query, key) * |key| >= gate.
A key of norm gate / t therefore fires exactly where cos(query, unit key) >= t, so each expert
carries its own threshold t >= gate in its key's norm, and the index, the store and the
serving kernels stay unchanged (search is by inner product).

Two facts whose loci are close (cos above the global gate: "Kayunga District" and "Gangseo
District" both key on "District") would otherwise fire each other's experts and overwrite each
other's answers. When a new key lands near stored ones, both thresholds rise to just above
their similarity, so neither fires at the other's locus while each still fires at its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from expert_store.store import ExpertStore
from model.config import MemoryConfig

NEIGHBOURS = 16  # stored keys examined per new key


def threshold_of(keys: np.ndarray, gate: float) -> np.ndarray:
    """Each key's own firing threshold on cos(query, unit key)."""
    return gate / np.linalg.norm(keys, axis=-1)


def scaled(unit_keys: np.ndarray, thresholds: np.ndarray, gate: float) -> np.ndarray:
    return unit_keys * (gate / thresholds)[:, None]


# A key's cosine with the query at its own locus stays this much above the highest threshold
# separation can give it, so raising a gate never silences a fact on its own question.
OWN_LOCUS_MARGIN = 0.005


def lean_toward(alone: torch.Tensor, later: torch.Tensor, floor: float) -> torch.Tensor:
    """Unit keys between `alone` (n, d_k) and `later`: normalize(alone + w * later), with the
    largest w <= 1 that keeps cos(key, alone) >= floor (w = 1 for nearly every fact)."""
    def key(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(alone + w[:, None] * later, dim=-1)

    def own(w: torch.Tensor) -> torch.Tensor:
        return (key(w) * alone).sum(-1)

    # cos(key, alone) falls as w grows: bisect for the floor (lo -> 1 where w = 1 keeps it).
    lo, hi = torch.zeros(len(alone)), torch.ones(len(alone))
    for _ in range(30):
        mid = (lo + hi) / 2
        keeps = own(mid) >= floor
        lo, hi = torch.where(keeps, mid, lo), torch.where(keeps, hi, mid)
    return key(lo)


@dataclass
class GatePlan:
    new_keys: np.ndarray  # (n, d_k) keys to store for the new facts
    rekeyed_ids: np.ndarray  # stored experts whose threshold rises
    rekeyed_keys: np.ndarray  # their new keys


def separate(store: ExpertStore, unit_keys: np.ndarray, cfg: MemoryConfig) -> GatePlan:
    """Thresholds for new unit keys (n, d_k) that keep them and stored keys apart."""
    n = len(unit_keys)
    unit_keys = np.asarray(unit_keys, dtype=np.float32)
    thresholds = np.full(n, cfg.gate, dtype=np.float32)
    raise_to: dict[int, float] = {}
    if len(store):
        _, ids = store.search(unit_keys, min(NEIGHBOURS, len(store)))
        for i in range(n):
            found = ids[i][ids[i] >= 0]
            if not len(found):
                continue
            stored = store.read_keys(found)
            norms = np.linalg.norm(stored, axis=1)
            cos = (stored / norms[:, None]) @ unit_keys[i]
            apart = np.minimum(cos + cfg.gate_separation, cfg.max_threshold)
            thresholds[i] = max(thresholds[i], float(apart.max()))
            old = cfg.gate / norms
            for expert, t_old, t_new in zip(found, old, apart):
                if t_new > t_old:
                    raise_to[int(expert)] = max(raise_to.get(int(expert), 0.0), float(t_new))
    # New facts of one batch stay apart from each other too.
    if n > 1:
        cos = unit_keys @ unit_keys.T
        np.fill_diagonal(cos, -1.0)
        thresholds = np.maximum(thresholds, np.minimum(cos.max(1) + cfg.gate_separation,
                                                       cfg.max_threshold))
    rekeyed = np.array(sorted(raise_to), dtype=np.int64)
    if len(rekeyed):
        stored = store.read_keys(rekeyed)
        units = stored / np.linalg.norm(stored, axis=1, keepdims=True)
        rekeyed_keys = scaled(units, np.array([raise_to[i] for i in rekeyed]), cfg.gate)
    else:
        rekeyed_keys = np.zeros((0, unit_keys.shape[1]), dtype=np.float32)
    return GatePlan(scaled(unit_keys, thresholds, cfg.gate).astype(np.float32), rekeyed,
                    rekeyed_keys.astype(np.float32))
