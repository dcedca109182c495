"""Per-expert thresholds: close loci stop firing each other, far ones are left alone."""

from __future__ import annotations

import numpy as np

from expert_store.config import StoreConfig
from expert_store.store import ExpertStore
from model.config import MemoryConfig
from model.expert_gates import separate, threshold_of

D_K = 32
CFG = MemoryConfig(d_k=D_K, gate=0.85, gate_separation=0.02, max_threshold=0.98)


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def near(key, cos, rng):
    """A unit vector at exactly `cos` from unit `key`."""
    other = rng.standard_normal(D_K)
    other = unit(other - (other @ key) * key)
    return unit(cos * key + np.sqrt(1 - cos ** 2) * other)


def fires(query, keys, gate=CFG.gate):
    return (keys @ query) >= gate  # the serving rule: one global gate on the inner product


def test_close_facts_stop_firing_each_other_but_fire_at_their_own_locus(tmp_path):
    rng = np.random.default_rng(0)
    store = ExpertStore.open(tmp_path, StoreConfig(d_k=D_K, value_shape=(4,)))
    old = unit(rng.standard_normal(D_K))
    far = near(old, 0.1, rng)
    store.add(np.stack([old, far]), np.zeros((2, 4)), np.array([1, 2]))
    new = near(old, 0.9, rng)
    assert fires(new, old[None])[0] and fires(old, new[None])[0]  # collide at the global gate

    plan = separate(store, new[None], CFG)
    store.write_keys(plan.rekeyed_ids, plan.rekeyed_keys)
    assert plan.rekeyed_ids.tolist() == [0]  # only the close one is re-keyed
    stored_old = store.read_keys([0])[0]
    assert not fires(new, stored_old[None])[0] and not fires(old, plan.new_keys)[0]
    assert fires(old, stored_old[None])[0] and fires(new, plan.new_keys)[0]
    np.testing.assert_allclose(threshold_of(plan.new_keys, CFG.gate), [0.92], atol=1e-5)
    np.testing.assert_allclose(store.read_keys([1])[0], far)  # untouched


def test_thresholds_never_pass_the_cap_and_batch_members_separate():
    rng = np.random.default_rng(1)
    a = unit(rng.standard_normal(D_K))
    twins = np.stack([a, near(a, 0.995, rng), unit(rng.standard_normal(D_K))])
    store = ExpertStore.open(__import__("tempfile").mkdtemp(), StoreConfig(d_k=D_K,
                                                                           value_shape=(4,)))
    plan = separate(store, twins, CFG)
    t = threshold_of(plan.new_keys, CFG.gate)
    np.testing.assert_allclose(t[:2], [CFG.max_threshold] * 2, atol=1e-5)
    assert t[2] == np.float32(CFG.gate) or abs(t[2] - CFG.gate) < 1e-5
    for i in range(3):  # every fact still fires at its own locus
        assert fires(twins[i], plan.new_keys[i:i + 1])[0]
