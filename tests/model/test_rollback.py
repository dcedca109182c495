"""A batch that fails once the store has changed leaves nothing of itself behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from model.config import MemoryConfig, TrainConfig
from model.facts import encode_fact
from model.memorize import Memorizer, answer_matches
from model.memory_runtime import load_memory
from model.reference import ReferenceServing
from tests.model.conftest import DATA


class FailingServing(ReferenceServing):
    """Answers like the reference model, but its `fail_at`-th call of `method` raises (as an
    engine that dies or times out)."""

    def __init__(self, ref, method: str, fail_at: int):
        super().__init__(ref)
        self.method, self.fail_at, self.calls = method, fail_at, 0

    def _maybe_fail(self, method: str) -> None:
        if method == self.method:
            self.calls += 1
            if self.calls == self.fail_at:
                raise TimeoutError("the engine did not answer")

    def publish(self, version: int) -> None:
        self._maybe_fail("publish")

    def answers(self, facts):
        self._maybe_fail("answers")
        return super().answers(facts)


def _fact(reference, row, completion=None):
    return encode_fact(reference.tokenizer, {"prompt": row["prompt"],
                                             "completion": completion or row["target_new"],
                                             "subject": row["subject"]}, 512)


def _store_state(store):
    ids = store.allocated_ids()
    return {int(i): (store.read_keys([i])[0].tobytes(), store.read_values([i])[0].tobytes(),
                     int(store.owner_of([i])[0])) for i in ids}


def _first_of_two_districts(reference, router_dir, tmp_path):
    """A store holding the first of two District facts (close loci: the second moves the
    first one's gate); returns (memory, memorizer, the second fact, recall, the first)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    district = [r for r in rows if r["subject"].endswith(" District")][:2]
    shutil.copytree(router_dir, tmp_path / "router")
    memory = load_memory(tmp_path / "store", tmp_path / "router", MemoryConfig(),
                         reference.d_model)
    reference.attach(memory)
    memorizer = Memorizer(reference, memory, TrainConfig())
    first = _fact(reference, district[0])
    facts = {1: first}

    def recall(owners):
        return [facts.get(o) for o in owners]

    [ok] = memorizer.memorize([1], [first], ReferenceServing(reference), recall=recall)
    assert ok.memorized
    memorizer.batch_recorded()
    return memory, memorizer, _fact(reference, district[1]), recall, first


def test_a_failed_batch_is_rolled_back_and_neighbours_stay(reference, router_dir, tmp_path):
    memory, memorizer, second, recall, first = _first_of_two_districts(reference, router_dir,
                                                                       tmp_path)
    before = _store_state(memory.store)

    # The second District fact moves the first one's gate; verification then fails.
    for method in ("answers", "publish"):
        serving = FailingServing(reference, method, fail_at=1)
        [outcome] = memorizer.memorize([2], [second], serving, recall=recall)
        assert not outcome.memorized and "rolled back" in outcome.error
        assert _store_state(memory.store) == before, method
        memory.refresh()
        assert answer_matches(ReferenceServing(reference).answers([first])[0],
                              first.answer_text)


def test_a_failed_replacement_puts_the_old_fact_back(reference, router_dir, tmp_path):
    row = json.loads(DATA.read_text().splitlines()[5])
    cfg = MemoryConfig()
    shutil.copytree(router_dir, tmp_path / "router")
    memory = load_memory(tmp_path / "store", tmp_path / "router", cfg, reference.d_model)
    reference.attach(memory)
    memorizer = Memorizer(reference, memory, TrainConfig())
    old = _fact(reference, row)
    [ok] = memorizer.memorize([1], [old], ReferenceServing(reference),
                              recall=lambda owners: [old if o == 1 else None for o in owners])
    assert ok.memorized
    new = _fact(reference, row, completion="Zanzibar")
    [outcome] = memorizer.memorize([2], [new], FailingServing(reference, "answers", 1),
                                   recall=lambda owners: [old if o == 1 else None for o in owners])
    assert not outcome.memorized and list(outcome.restored) == [1]
    owners = memory.store.owner_of(memory.store.allocated_ids())
    assert owners.tolist() == [1]
    memory.refresh()
    assert answer_matches(ReferenceServing(reference).answers([old])[0], old.answer_text)
    assert np.array_equal(memory.store.allocated_ids(), np.array(outcome.restored[1]))


class ProcessKilled(BaseException):
    """Stands for SIGKILL: nothing in the memorizer catches it, nothing after it runs."""


class DyingServing(ReferenceServing):
    """Reports every fact wrong `misses` times (so the batch retrains its neighbours too),
    then dies at the next verification."""

    def __init__(self, ref, misses: int):
        super().__init__(ref)
        self.misses = misses

    def publish(self, version: int) -> None:
        pass

    def answers(self, facts):
        if self.misses == 0:
            raise ProcessKilled
        self.misses -= 1
        return [""] * len(facts)


@pytest.mark.parametrize(("misses", "outcome_recorded"), [(0, False), (1, False), (0, True)],
                         ids=["gates-moved", "neighbour-retrained", "recorded-in-part"])
def test_a_batch_killed_midway_leaves_its_neighbours_as_they_were(
        reference, router_dir, tmp_path, misses, outcome_recorded):
    memory, memorizer, second, recall, first = _first_of_two_districts(reference, router_dir,
                                                                       tmp_path)
    before = _store_state(memory.store)

    with pytest.raises(ProcessKilled):
        memorizer.memorize([2], [second], DyingServing(reference, misses), recall=recall)
    moved = {i: row for i, row in _store_state(memory.store).items() if row[2] == 1}
    assert moved != before  # the first fact's row was changed by the dead batch

    # A restart opens the store from disk; recovery puts the rows back and frees the orphan.
    reopened = load_memory(tmp_path / "store", tmp_path / "router", MemoryConfig(),
                         reference.d_model)
    if outcome_recorded:  # fact 2 memorized before the kill: its neighbour stays as verified
        assert Memorizer(reference, reopened, TrainConfig()).undo_interrupted_batch({1, 2}) == 0
        assert {i: r for i, r in _store_state(reopened.store).items() if r[2] == 1} == moved
        return
    # Fact 1 has its outcome (memorized), fact 2 of the dead batch none.
    assert Memorizer(reference, reopened, TrainConfig()).undo_interrupted_batch({1}) >= 1
    store = reopened.store
    ids = store.allocated_ids()
    store.free(ids[store.owner_of(ids) == 2])
    assert _store_state(store) == before
    assert Memorizer(reference, reopened, TrainConfig()).undo_interrupted_batch({1}) == 0


class FirstAlwaysWrong(ReferenceServing):
    """Answers like the reference model, but `victim` never answers right."""

    def __init__(self, ref, victim):
        super().__init__(ref)
        self.victim = victim

    def answers(self, facts):
        return ["" if f is self.victim else text
                for f, text in zip(facts, super().answers(facts))]


def test_a_neighbour_broken_where_no_new_expert_fires_rolls_the_batch_back(
        reference, router_dir, tmp_path):
    """The second District fact moves the first one's gate but its expert does not fire in
    the first one's prompt: no new fact is to blame, so the whole batch goes."""
    from model.trainer import fires_in

    memory, memorizer, second, recall, first = _first_of_two_districts(reference, router_dir,
                                                                       tmp_path)
    before = _store_state(memory.store)
    [outcome] = memorizer.memorize([2], [second], FirstAlwaysWrong(reference, first),
                                   recall=recall)
    assert not outcome.memorized and "rolled back" in outcome.error
    assert _store_state(memory.store) == before
    # Had it stayed, its expert would not have fired in the first fact's row.
    keys = memorizer.keys_for([second])
    assert not fires_in(reference, memory, [first], keys).any()
