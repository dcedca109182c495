"""The index functions against brute-force numpy search."""

from __future__ import annotations

import numpy as np
import pytest

from expert_store import index as ix
from expert_store.config import IndexConfig


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, rng, centres: int = 256) -> np.ndarray:
    """Keys with cluster structure, like hidden states of related tokens."""
    c = rng.standard_normal((centres, d))
    return _unit(c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, d)))


def test_flat_matches_brute_force():
    rng = np.random.default_rng(0)
    xb, xq = _unit(rng.standard_normal((500, 16))), _unit(rng.standard_normal((7, 16)))
    ids = rng.permutation(10_000)[:500]
    D, I = ix.search(ix.build_index(xb, ids, 16, IndexConfig()), xq, 5)
    scores = xq @ xb.T
    expected = ids[np.argsort(-scores, axis=1)[:, :5]]
    np.testing.assert_array_equal(I, expected)
    np.testing.assert_allclose(D, np.sort(scores, axis=1)[:, ::-1][:, :5], rtol=1e-5)


def test_remove_and_empty_index():
    rng = np.random.default_rng(1)
    xb = _unit(rng.standard_normal((10, 8)))
    index = ix.build_index(xb, np.arange(10), 8, IndexConfig())
    assert ix.remove(index, np.array([3, 99])) == 1
    _, I = ix.search(index, xb[3:4], 10)
    assert 3 not in I[0] and (I[0][-1] == -1)
    empty = ix.build_index(np.zeros((0, 8)), np.zeros(0, dtype=np.int64), 8, IndexConfig())
    D, I = ix.search(empty, xb[:2], 3)
    assert (I == -1).all()


def test_shapes_are_checked():
    index = ix.build_index(np.zeros((1, 4)), np.array([0]), 4, IndexConfig())
    with pytest.raises(ValueError, match="xq"):
        ix.search(index, np.zeros((2, 5)), 1)
    with pytest.raises(ValueError, match="ids"):
        ix.build_index(np.zeros((2, 4)), np.array([0]), 4, IndexConfig())


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_against_exact(kind):
    rng = np.random.default_rng(2)
    xb = clustered(20_000, 32, rng)
    xq = clustered(64, 32, rng)
    ids = np.arange(len(xb))
    exact = ix.build_index(xb, ids, 32, IndexConfig(kind="flat"))
    approx = ix.build_index(xb, ids, 32, IndexConfig(kind=kind, ivf_nprobe=16))
    _, I_exact = ix.search(exact, xq, 32)
    _, I_approx = ix.search(approx, xq, 32)
    assert ix.recall_at_k(I_approx, I_exact) >= 0.9
    # A stored key is always its own nearest neighbour.
    _, I_self = ix.search(approx, xb[:50], 1)
    assert (I_self[:, 0] == ids[:50]).mean() >= 0.98
