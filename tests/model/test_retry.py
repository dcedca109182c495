"""A retry retrains what missed and what collides with it, nothing more; a stored fact left
wrong costs only the new facts whose experts fire in it."""

from __future__ import annotations

import json

import numpy as np
import torch

import model.memorize as memorize
from model.config import MemoryConfig, TrainConfig
from model.facts import encode_fact
from model.memorize import Memorizer, _with_colliders, answer_matches
from model.reference import ReferenceServing
from model.trainer import fires_in
from tests.model.conftest import DATA
from tests.model.test_rollback import _store_state
from tests.model.test_trainer import _fresh_memory


def test_colliders_are_the_closure_of_experts_firing_in_missed_rows():
    fires = torch.zeros(5, 5, dtype=torch.bool)
    fires[0, 2] = True  # fact 2's expert fires in fact 0's row: it collides
    fires[2, 3] = True  # ... and fact 3's in fact 2's: so does fact 3
    fires[1, 0] = True  # fact 0's expert fires in fact 1's row: fact 1 is only guarded
    fires[4, 4] = True
    assert _with_colliders([0], fires) == [0, 2, 3]
    assert _with_colliders([4], fires) == [4]
    assert _with_colliders([], fires) == []


def _completion(reference, prompt, completion, subject):
    return encode_fact(reference.tokenizer, {"prompt": prompt, "completion": completion,
                                             "subject": subject}, 512)


def test_a_miss_retrains_its_colliders_and_keeps_the_rest(reference, router_dir, tmp_path,
                                                         monkeypatch):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    darrieux = rows[0]
    facts = [_completion(reference, darrieux["prompt"], darrieux["target_new"],
                         darrieux["subject"]),
             # The same words up to the key token: the keys are the same, and so is the gate.
             _completion(reference, "The mother tongue of Danielle Darrieux, the actress, is",
                         "Swedish", darrieux["subject"]),
             _completion(reference, "The Eiffel Tower is located in", "Rome",
                         "The Eiffel Tower")]
    memory = _fresh_memory(reference, router_dir, tmp_path, MemoryConfig())
    memorizer = Memorizer(reference, memory, TrainConfig())
    trained, results = [], []
    train = memorize.train_facts

    def spy(ref, mem, batch_facts, *args, **kwargs):
        trained.append(list(batch_facts))
        results.append(train(ref, mem, batch_facts, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(memorize, "train_facts", spy)
    committed = {}

    class FirstMisses(ReferenceServing):
        """The first round reports the first fact wrong (a retry follows)."""

        def answers(self, checked):
            out = super().answers(checked)
            if len(trained) == 1:
                committed["eiffel"] = memory.store.read_values(memory.store.ids_of_owner(3))
                out[0] = ""
            return out

    outcomes = memorizer.memorize([1, 2, 3], facts, FirstMisses(reference))
    assert all(o.memorized for o in outcomes), [o.error for o in outcomes]

    # The two Darrieux experts fire in each other's rows, the Eiffel one in neither: the
    # retry trains the Darrieux pair only.
    ids = np.array([o.expert_ids[0] for o in outcomes])
    fires = fires_in(reference, memory, facts, torch.from_numpy(memory.store.read_keys(ids)))
    assert bool(fires[0, 1]) and bool(fires[1, 0])
    assert not fires[:2, 2].any() and not fires[2, :2].any()
    assert len(trained) == 2
    assert [f.prompt_ids for f in trained[1]] == [f.prompt_ids for f in facts[:2]]
    np.testing.assert_array_equal(memory.store.read_values(ids[2:]), committed["eiffel"])
    # Steps are per fact: Eiffel's are those its expert trained in the first round only.
    assert outcomes[2].steps == results[0].expert_steps[2]
    assert outcomes[0].steps == results[0].expert_steps[0] + results[1].expert_steps[0]


class BreaksWhileStored(ReferenceServing):
    """Answers like the reference model, except that `victim` answers wrong while the expert
    of fact `owner` is in the store (a neighbour that a new fact breaks for good)."""

    def __init__(self, ref, store, victim, owner: int):
        super().__init__(ref)
        self.store, self.victim, self.owner = store, victim, owner

    def answers(self, facts):
        out = super().answers(facts)
        if len(self.store.ids_of_owner(self.owner)):
            out = ["" if f is self.victim else text for f, text in zip(facts, out)]
        return out


def test_a_broken_neighbour_drops_only_the_facts_firing_in_it(reference, router_dir,
                                                              tmp_path):
    """A key on the shared word " within" fires on a stored prompt keyed on its own subject.
    When that stored fact will not answer again, the new fact firing in it is dropped, the
    stored fact gets its rows back as before the batch, and an unrelated new fact stays."""
    memory = _fresh_memory(reference, router_dir, tmp_path, MemoryConfig())
    stored = _completion(reference, "Ostankinsky District is within", "Leeds",
                         "Ostankinsky District")
    shared = _completion(reference, "home counties is within", "Pennsylvania", "within")
    other = _completion(reference, "The Eiffel Tower is located in", "Rome", "The Eiffel Tower")
    facts = {1: stored, 2: shared, 3: other}
    recall = lambda owners: [facts.get(o) for o in owners]  # noqa: E731
    memorizer = Memorizer(reference, memory, TrainConfig())
    [first] = memorizer.memorize([1], [stored], ReferenceServing(reference), recall=recall)
    assert first.memorized, first.error
    memorizer.batch_recorded()
    before = _store_state(memory.store)

    serving = BreaksWhileStored(reference, memory.store, stored, owner=2)
    dropped, kept = memorizer.memorize([2, 3], [shared, other], serving, recall=recall)
    assert not dropped.memorized and "dropped" in dropped.error
    assert kept.memorized, kept.error
    state = _store_state(memory.store)
    assert {i: r for i, r in state.items() if r[2] == 1} == before
    assert sorted(r[2] for r in state.values()) == [1, 3]
    memory.refresh()
    assert answer_matches(ReferenceServing(reference).answers([stored])[0], stored.answer_text)
