"""Device cache as a state machine: LRU order, pinning, counters, and refresh on new versions."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from expert_store.config import StoreConfig
from expert_store.device_cache import DeviceCache
from expert_store.store import ExpertStore

N_EXPERTS, CAPACITY = 12, 4


def filled_store(path) -> ExpertStore:
    store = ExpertStore.open(path, StoreConfig(d_k=2, value_shape=(3,)))
    values = np.arange(N_EXPERTS * 3, dtype=np.float32).reshape(N_EXPERTS, 3)
    store.add(np.ones((N_EXPERTS, 2), np.float32), values, 1)
    return store


class CacheMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        import tempfile

        self.store = filled_store(tempfile.mkdtemp())
        self.cache = DeviceCache(self.store, CAPACITY)
        self.lru: OrderedDict[int, None] = OrderedDict()  # model of residency, LRU first
        self.pinned: set[int] = set()
        self.hits = self.misses = self.evictions = 0

    def _model_lookup(self, ids):
        unique = list(dict.fromkeys(ids))
        for e in unique:
            if e in self.lru:
                self.hits += 1
                self.lru.move_to_end(e)
            else:
                self.misses += 1
                if len(self.lru) == CAPACITY:
                    victim = next(v for v in self.lru if v not in self.pinned and v not in unique)
                    del self.lru[victim]
                    self.evictions += 1
                self.lru[e] = None

    @rule(ids=st.lists(st.integers(0, N_EXPERTS - 1), min_size=1, max_size=3))
    def lookup(self, ids):
        if len(set(ids) | self.pinned) > CAPACITY:
            return  # the cache would refuse; covered by a dedicated test
        rows = self.cache.lookup(np.array(ids))
        np.testing.assert_array_equal(rows.numpy(), self.store.read_values(np.array(ids)))
        self._model_lookup(ids)

    @rule(e=st.integers(0, N_EXPERTS - 1))
    def pin(self, e):
        if e in self.pinned:
            assert self.cache.pin(e) is False
            return
        if len(self.pinned) + 1 >= CAPACITY:
            return
        assert self.cache.pin(e) is True  # loads it through a lookup
        self._model_lookup([e])
        self.pinned.add(e)

    @rule(e=st.integers(0, N_EXPERTS - 1))
    def unpin(self, e):
        assert self.cache.unpin(e) == (e in self.pinned)
        self.pinned.discard(e)

    @invariant()
    def agrees(self):
        assert [e for e in self.cache._slot_of] == list(self.lru)
        stats = self.cache.stats
        assert (stats.hits, stats.misses, stats.evictions) == (self.hits, self.misses,
                                                               self.evictions)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_refresh_drops_stale_rows(tmp_path):
    store = filled_store(tmp_path)
    cache = DeviceCache(store, CAPACITY)
    assert cache.lookup(np.array([2]))[0, 0].item() == 6.0
    store.write_values(np.array([2]), np.full((1, 3), -1.0))
    assert cache.lookup(np.array([2]))[0, 0].item() == 6.0  # stale until refreshed
    assert cache.refresh() is True
    assert cache.lookup(np.array([2]))[0, 0].item() == -1.0
    assert cache.refresh() is False


def test_too_many_distinct_or_pinned_is_refused(tmp_path):
    cache = DeviceCache(filled_store(tmp_path), 2)
    with pytest.raises(ValueError):
        cache.lookup(np.array([0, 1, 2]))
    cache.pin(0)
    cache.pin(1)
    with pytest.raises(RuntimeError):
        cache.lookup(np.array([5]))


def test_slots_live_on_the_requested_device(tmp_path):
    cache = DeviceCache(filled_store(tmp_path), 2, device="cpu", dtype=torch.float16)
    assert cache.lookup(np.array([1])).dtype == torch.float16


def test_lookups_and_invalidations_from_two_threads(tmp_path):
    # The serving side invalidates (a delete refreshes the engine) while the memorization
    # worker looks values up for training: every lookup must return the stored rows.
    import sys
    import threading

    store = filled_store(tmp_path)
    cache = DeviceCache(store, CAPACITY)
    expected = torch.from_numpy(store.read_values(np.arange(N_EXPERTS)))
    errors: list[BaseException] = []
    stop = threading.Event()

    def invalidate_forever():
        while not stop.is_set():
            cache.invalidate()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    thread = threading.Thread(target=invalidate_forever)
    thread.start()
    rng = np.random.default_rng(0)
    try:
        for _ in range(3000):
            ids = rng.choice(N_EXPERTS, size=3, replace=False)
            try:
                torch.testing.assert_close(cache.lookup(ids), expected[ids])
            except BaseException as exc:  # noqa: BLE001 - the race shows as any error
                errors.append(exc)
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert not errors, errors[0]
