"""The store against a simple model of it (hypothesis state machine), plus targeted cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from expert_store.config import StoreConfig
from expert_store.store import ExpertStore

D_K, SHAPE = 4, (2, 3)


def make_cfg(capacity: int = 2) -> StoreConfig:
    return StoreConfig(d_k=D_K, value_shape=SHAPE, initial_capacity=capacity)


def unit_rows(rng, n):
    x = rng.standard_normal((n, D_K)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class StoreMachine(RuleBasedStateMachine):
    """Model: expert id -> (key, value, owner). Reopening must preserve it exactly."""

    @initialize()
    def open_store(self):
        import tempfile

        self.dir = tempfile.mkdtemp()
        self.store = ExpertStore.open(self.dir, make_cfg())
        # Another process's handle (the serving engine's): it only follows the writer's commits.
        self.follower = ExpertStore.open(self.dir)
        self.model: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        self.rng = np.random.default_rng(0)
        self.version = self.store.version
        self.quarantined: set[int] = set()  # freed, and no serving engine confirmed it yet

    @rule(n=st.integers(1, 5), owner=st.integers(0, 3))
    def add(self, n, owner):
        keys = unit_rows(self.rng, n)
        values = self.rng.standard_normal((n, *SHAPE)).astype(np.float32)
        ids = self.store.add(keys, values, owner)
        assert len(set(ids.tolist())) == n
        for i, expert_id in enumerate(ids.tolist()):
            assert expert_id not in self.model, "allocated an expert that is in use"
            assert expert_id not in self.quarantined, "reused a row an engine may still serve"
            self.model[expert_id] = (keys[i], values[i], owner)
        self.version += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def write_values(self, data):
        expert_id = data.draw(st.sampled_from(sorted(self.model)))
        value = self.rng.standard_normal((1, *SHAPE)).astype(np.float32)
        self.store.write_values(np.array([expert_id]), value)
        key, _, owner = self.model[expert_id]
        self.model[expert_id] = (key, value[0], owner)
        self.version += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def write_keys(self, data):
        expert_id = data.draw(st.sampled_from(sorted(self.model)))
        key = unit_rows(self.rng, 1)
        self.store.write_keys(np.array([expert_id]), key)
        _, value, owner = self.model[expert_id]
        self.model[expert_id] = (key[0], value, owner)
        self.version += 1

    @rule(data=st.data())
    def free(self, data):
        candidates = sorted(self.model) + [10_000]
        chosen = data.draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True))
        expected = sum(1 for c in chosen if c in self.model)
        assert self.store.free(np.array(chosen, dtype=np.int64)) == expected
        for c in chosen:
            if self.model.pop(c, None) is not None:
                self.quarantined.add(c)
        if expected:
            self.version += 1

    @rule()
    def engines_confirm(self):
        # Every serving process now serves the current version: freed rows may be reused.
        self.store.release_freed(self.store.version)
        self.quarantined.clear()

    @rule()
    def checkpoint(self):
        self.store.checkpoint()

    @rule()
    def follower_checkpoints(self):
        # A lagging handle that checkpoints must catch up first, not empty newer records.
        self.follower.checkpoint()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = ExpertStore.open(self.dir)

    @rule()
    def reopen_without_checkpoint(self):
        # As after a crash: tables may be behind, the WAL replays the rest.
        self.store._wal.close()
        self.store = ExpertStore.open(self.dir)

    @invariant()
    def matches_model(self):
        self.follower.refresh()
        for store in (self.store, self.follower):
            self.check(store)

    def check(self, store):
        assert store.version == self.version
        assert len(store) == len(self.model)
        assert sorted(store.allocated_ids().tolist()) == sorted(self.model)
        for expert_id, (key, value, owner) in self.model.items():
            np.testing.assert_array_equal(store.read_keys([expert_id])[0], key)
            np.testing.assert_array_equal(store.read_values([expert_id])[0], value)
            assert store.owner_of([expert_id])[0] == owner
        if self.model:
            ids = sorted(self.model)
            keys = np.stack([self.model[i][0] for i in ids])
            D, I = store.search(keys, 1)
            # Each key finds itself (or an identical-score twin) with score ~1.
            assert np.allclose(D[:, 0], 1.0, atol=1e-5)

    def teardown(self):
        self.store.close()
        self.follower.close()


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)


def test_freed_experts_are_reused_lowest_first(tmp_path):
    store = ExpertStore.open(tmp_path, make_cfg())
    rng = np.random.default_rng(0)
    ids = store.add(unit_rows(rng, 6), np.zeros((6, *SHAPE)), 1)
    assert ids.tolist() == list(range(6))
    store.free(np.array([4, 1]))
    store.release_freed(store.version)
    assert store.add(unit_rows(rng, 3), np.ones((3, *SHAPE)), 2).tolist() == [1, 4, 6]
    assert store.keys.capacity >= 7


def test_freed_rows_wait_until_the_engines_serve_past_their_free(tmp_path):
    # An engine still on an older index finds the freed key: the row must keep its value and
    # must not be handed to another fact until the engines confirm a later version.
    store = ExpertStore.open(tmp_path, make_cfg())
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    store.add(unit_rows(rng, 3), values, 1)
    store.free(np.array([1]))
    freed_at = store.version
    np.testing.assert_array_equal(store.read_values([1])[0], values[1])
    assert store.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), 2).tolist() == [3]
    assert store.release_freed(freed_at - 1) == 0
    assert store.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), 2).tolist() == [4]
    assert store.release_freed(freed_at) == 1
    assert store.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), 2).tolist() == [1]
    # A store reopened after a crash does not know what the engines saw: quarantined again.
    store.free(np.array([0]))
    store._wal.close()
    reopened = ExpertStore.open(tmp_path)
    assert reopened.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), 3).tolist() == [5]
    reopened.release_freed(reopened.version)
    assert reopened.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), 3).tolist() == [0]


def test_bad_writes_are_refused_and_change_nothing(tmp_path):
    store = ExpertStore.open(tmp_path, make_cfg())
    with pytest.raises(ValueError, match="keys"):
        store.add(np.zeros((1, D_K + 1)), np.zeros((1, *SHAPE)), 1)
    with pytest.raises(ValueError, match="finite"):
        store.add(np.full((1, D_K), np.nan), np.zeros((1, *SHAPE)), 1)
    with pytest.raises(KeyError):
        store.write_values(np.array([0]), np.zeros((1, *SHAPE)))
    assert store.version == 0 and len(store) == 0


def test_reopen_with_other_shape_is_refused(tmp_path):
    ExpertStore.open(tmp_path, make_cfg()).close()
    with pytest.raises(ValueError, match="d_k"):
        ExpertStore.open(tmp_path, StoreConfig(d_k=8, value_shape=SHAPE))


def test_corrupt_meta_is_detected(tmp_path):
    ExpertStore.open(tmp_path, make_cfg()).close()
    meta = tmp_path / "meta.json"
    meta.write_text(meta.read_text().replace('"version": 0', '"version": 7'))
    with pytest.raises(Exception, match="checksum"):
        ExpertStore.open(tmp_path)


def test_torn_wal_tail_is_dropped(tmp_path):
    store = ExpertStore.open(tmp_path, make_cfg())
    rng = np.random.default_rng(0)
    store.add(unit_rows(rng, 2), np.ones((2, *SHAPE)), 5)
    store._wal.close()
    with open(tmp_path / "wal.log", "ab") as f:
        f.write(b"MWAL" + b"\x02" * 20)  # a record cut short by a crash
    reopened = ExpertStore.open(tmp_path)
    assert reopened.version == 1 and len(reopened) == 2
    reopened.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), 6)
    reopened._wal.close()
    again = ExpertStore.open(tmp_path)
    assert again.version == 2 and len(again) == 3


def test_a_follower_reads_on_where_it_stopped(tmp_path):
    writer = ExpertStore.open(tmp_path, make_cfg())
    follower = ExpertStore.open(tmp_path)
    rng = np.random.default_rng(0)
    writer.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), 1)
    assert follower.refresh() and follower.version == 1
    # Spoil the first record: a follower that re-read the log from its start would stop there.
    with open(tmp_path / "wal.log", "r+b") as f:
        f.write(b"XXXX")
    writer.add(unit_rows(rng, 1), np.full((1, *SHAPE), 2.0), 2)
    assert follower.refresh() and follower.version == 2
    assert follower.owner_of([1])[0] == 2


def test_a_follower_rereads_a_log_emptied_by_another_handle(tmp_path):
    writer = ExpertStore.open(tmp_path, make_cfg(capacity=8))
    follower = ExpertStore.open(tmp_path)
    rng = np.random.default_rng(0)
    for owner in (1, 2):
        writer.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), owner)
    follower.refresh()
    size_followed = (tmp_path / "wal.log").stat().st_size
    writer.checkpoint()  # at version 2, which the follower already has
    for owner in (3, 4):
        writer.add(unit_rows(rng, 1), np.ones((1, *SHAPE)), owner)
    # The emptied log grew back to the very size the follower stopped at.
    assert (tmp_path / "wal.log").stat().st_size == size_followed
    assert follower.refresh() and follower.version == 4
    assert sorted(follower.owner_of(follower.allocated_ids()).tolist()) == [1, 2, 3, 4]


def test_an_index_override_builds_ivf_above_the_auto_threshold_and_is_not_saved(tmp_path):
    from expert_store.config import IndexConfig

    rng = np.random.default_rng(3)
    keys = unit_rows(rng, 5000)
    store = ExpertStore.open(tmp_path, make_cfg())
    store.add(keys, np.zeros((5000, *SHAPE), dtype=np.float32), 1)
    assert store.index_kind == "flat"
    store.close()
    auto = IndexConfig(kind="auto", auto_ivf_min=4096, ivf_nprobe=16)
    store = ExpertStore.open(tmp_path, index=auto)
    assert store.index_kind == "ivf"
    # Deleting and writing go through the IVF index as they go through the exact one.
    store.free(np.arange(10))
    D, I = store.search(keys[:20], 1)
    assert set(I[10:, 0]) == set(range(10, 20)) and not set(I[:10, 0]) & set(range(10))
    store.close()
    assert ExpertStore.open(tmp_path).index_kind == "flat"  # the saved config still says flat


def test_an_auto_index_turns_ivf_when_the_open_store_grows_past_the_threshold(tmp_path):
    from expert_store.config import IndexConfig

    rng = np.random.default_rng(4)
    auto = IndexConfig(kind="auto", auto_ivf_min=4096, ivf_nprobe=16)
    writer = ExpertStore.open(tmp_path, make_cfg(), index=auto)
    follower = ExpertStore.open(tmp_path, index=auto)  # another process: the serving engine
    writer.add(unit_rows(rng, 4000), np.zeros((4000, *SHAPE), dtype=np.float32), 1)
    assert follower.refresh() and (writer.index_kind, follower.index_kind) == ("flat", "flat")
    keys = unit_rows(rng, 200)
    ids = writer.add(keys, np.zeros((200, *SHAPE), dtype=np.float32), 2)
    assert writer.index_kind == "ivf"
    assert follower.refresh() and follower.index_kind == "ivf"
    for store in (writer, follower):  # the rebuilt index holds every expert, old and new
        assert store.search(keys, 1)[1][:, 0].tolist() == ids.tolist()
        assert store._index.ntotal == 4200


def test_an_auto_threshold_below_the_smallest_approximate_index_rebuilds_nothing(tmp_path):
    from expert_store.config import IndexConfig

    rng = np.random.default_rng(5)
    store = ExpertStore.open(tmp_path, make_cfg(), index=IndexConfig(kind="auto", auto_ivf_min=10))
    store.add(unit_rows(rng, 20), np.zeros((20, *SHAPE), dtype=np.float32), 1)
    index = store._index
    store.add(unit_rows(rng, 5), np.zeros((5, *SHAPE), dtype=np.float32), 2)
    assert store._index is index and store.index_kind == "flat"  # exact until 4,096 keys


def test_a_growth_cut_short_by_a_crash_is_finished_at_open(tmp_path):
    # Killed between growing the keys table and the values table (seen in the crash test):
    # the tables differ in size; writes check the keys table's size only, so without
    # repair the next checkpoint recorded a capacity the values table did not have, and
    # the store never opened again.
    store = ExpertStore.open(tmp_path, StoreConfig(d_k=8, value_shape=(16,), initial_capacity=4))
    store.add(np.ones((3, 8), np.float32), np.full((3, 16), 7, np.float32), 1)
    store.close()
    with open(tmp_path / "keys.f32", "r+b") as f:  # the keys table alone grew
        f.truncate(64 * 8 * 4)
    store = ExpertStore.open(tmp_path)
    assert store.values.capacity == store.owners.capacity == store.keys.capacity == 64
    ids = store.add(np.ones((40, 8), np.float32), np.full((40, 16), 9, np.float32), 2)
    store.close()
    store = ExpertStore.open(tmp_path)
    assert len(store) == 43 and (store.read_values(ids) == 9).all()
    assert (store.owner_of(np.arange(3, 64)) != 1).all()


def test_a_table_another_process_created_first_is_kept_whole(tmp_path):
    """Processes opening a store written before a table existed all create it at once: one
    that finds it made meanwhile keeps it, rather than truncating it under another's map."""
    from expert_store.tables import MappedTable

    theirs = MappedTable(tmp_path / "t.i64", (), "int64", 8, fill=-1)
    theirs.grow(32)
    theirs.array[20] = 7
    theirs._create(8)  # as a process that found no file, then lost the race to create it
    assert (tmp_path / "t.i64").stat().st_size == 32 * 8 and theirs.array[20] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.i64"]  # no staged file left
    fresh = MappedTable(tmp_path / "u.i64", (), "int64", 4, fill=-1)
    assert fresh.array.tolist() == [-1] * 4
