"""Pieces the benchmarks share: the development data, unrelated chat prompts, the router's
query at every token of a text, synthetic keys that follow that query distribution, and gate
recall (of the pairs above the gate that exact search finds, the share an index finds)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from expert_store import index as ix
from model.reference import right_padded

SUBJECTS = ["the ocean", "a violin", "Mount Everest", "the printing press", "honey bees",
            "the Roman Empire", "volcanoes", "a lighthouse", "chess", "the moon", "coffee",
            "glaciers", "the piano", "electricity", "owls", "the Silk Road"]
TEMPLATES = ["Write a short paragraph about {}.", "Tell me three facts about {}.",
             "Explain {} to a child.", "What is interesting about {}?"]


def default_data(dataset: str = "counterfact") -> Path:
    """The whole dev file of `dataset` (counterfact, zsre) where the development data is,
    else the tests' slice of it (425 CounterFact rows, 101 zsRE rows)."""
    root = Path(__file__).resolve().parents[1]
    full = root.parent / "shared" / "data" / f"{dataset}-dev.jsonl"
    return full if full.exists() else root / "tests" / "data" / f"{dataset}-slice.jsonl"


def token_queries(ref, router, texts: list[str], batch: int = 32) -> np.ndarray:
    """The router's unit query at every token of every text (as the memory layer routes).
    Texts are batched, padded on the right (`right_padded`)."""
    out = []
    for start in range(0, len(texts), batch):
        encoded = [ref.tokenizer(t).input_ids for t in texts[start:start + batch]]
        with torch.no_grad():
            h, _ = ref.lower(right_padded(encoded))
            q = router(h.reshape(-1, h.shape[-1])).reshape(len(encoded), h.shape[1], -1)
        out += [q[i, :len(e)].numpy() for i, e in enumerate(encoded)]
    return np.concatenate(out).astype(np.float32)


def synthetic_keys(pool: np.ndarray, n: int, rng) -> np.ndarray:
    """n unit keys, each a pool query moved to a random cosine in [0.80, 0.99] from it: real
    traffic's tokens then have many keys near (and above) the gate, the hard case for an
    approximate index."""
    keys = np.empty((n, pool.shape[1]), dtype=np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        base = pool[rng.integers(0, len(pool), m)]
        noise = rng.standard_normal(base.shape).astype(np.float32)
        noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to the base
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        cos = rng.uniform(0.80, 0.99, (m, 1)).astype(np.float32)
        keys[start:start + m] = cos * base + np.sqrt(1 - cos**2) * noise
    return keys


def pairs_above(D: np.ndarray, I: np.ndarray, gate: float) -> set[tuple[int, int]]:
    rows, cols = np.nonzero((D >= gate) & (I >= 0))
    return {(int(r), int(I[r, c])) for r, c in zip(rows, cols)}


def timed_search(index, xq: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Search all queries in batches of `batch` tokens; ms per batch."""
    D, I, start = [], [], time.perf_counter()
    for i in range(0, len(xq), batch):
        d, j = ix.search(index, xq[i:i + batch], k)
        D.append(d)
        I.append(j)
    ms = (time.perf_counter() - start) * 1000 / max(1, -(-len(xq) // batch))
    return np.concatenate(D), np.concatenate(I), ms


def recall(truth: set, found: set) -> float:
    return len(truth & found) / len(truth) if truth else 1.0
