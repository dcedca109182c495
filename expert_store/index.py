"""The index layer: plain functions on arrays, with faiss's names (xq, xb, k, D, I).

Keys are searched by inner product (the router normalizes its queries and keys, so this is
cosine similarity). Ids are the experts' row numbers in the store's tables.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from expert_store.config import IndexConfig


def _check(x: np.ndarray, d: int, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must have shape (n, {d}), got {x.shape}")
    return x


def _maybe_to_gpu(index: faiss.Index) -> faiss.Index:
    """On hosts with faiss's GPU build and a GPU, search there; elsewhere the CPU index."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


MIN_APPROXIMATE = 4096  # fewer keys than this are searched exactly whatever the kind


def build_index(xb: np.ndarray, ids: np.ndarray, d: int, cfg: IndexConfig) -> faiss.Index:
    """An index over keys `xb` (n, d) labelled with `ids` (n,)."""
    xb = _check(xb, d, "xb")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (xb.shape[0],):
        raise ValueError(f"ids must have shape ({xb.shape[0]},), got {ids.shape}")
    kind = cfg.kind
    if kind == "auto":
        kind = "ivf" if xb.shape[0] >= cfg.auto_ivf_min else "flat"
    if kind == "flat" or xb.shape[0] < MIN_APPROXIMATE:
        # Approximate indexes need enough points to train; small stores are searched exactly.
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        index.add_with_ids(xb, ids)
        return _maybe_to_gpu(index)
    if kind == "ivf":
        cells = cfg.ivf_cells or int(4 * math.sqrt(xb.shape[0]))
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
        sample = xb[np.random.default_rng(0).choice(xb.shape[0], min(xb.shape[0], 64 * cells),
                                                    replace=False)]
        ivf.train(sample)
        ivf.add_with_ids(xb, ids)
        ivf.nprobe = cfg.ivf_nprobe
        return _maybe_to_gpu(ivf)
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
        hnsw.hnsw.efSearch = cfg.hnsw_ef_search
        index = faiss.IndexIDMap2(hnsw)
        index.add_with_ids(xb, ids)
        return index  # faiss has no GPU HNSW
    raise ValueError(f"unknown index kind {kind!r}")


def describe(index: faiss.Index) -> str:
    """"flat", "ivf" or "hnsw": which structure a built index is."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"


def add(index: faiss.Index, xb: np.ndarray, ids: np.ndarray) -> None:
    index.add_with_ids(_check(xb, index.d, "xb"), np.ascontiguousarray(ids, dtype=np.int64))


def remove(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ids from the index; returns how many were there."""
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: D (nq, k) scores, I (nq, k) ids, -1 where fewer than k exist."""
    xq = _check(xq, index.d, "xq")
    if k < 1:
        raise ValueError("k must be at least 1")
    if index.ntotal == 0:
        return (np.full((xq.shape[0], k), -np.inf, dtype=np.float32),
                np.full((xq.shape[0], k), -1, dtype=np.int64))
    return index.search(xq, k)


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Share of the exact top-k ids that the approximate search also returned."""
    hits = sum(len(set(a[a >= 0]) & set(e[e >= 0])) for a, e in zip(I_approx, I_exact))
    total = int((I_exact >= 0).sum())
    return hits / total if total else 1.0
