"""Stored facts' turn queries: computed once per fact, kept up to a bound, never missed."""

from __future__ import annotations

import torch

from model.facts import EncodedFact
from model.stored_prompts import TurnQueries


def _fact(n: int) -> EncodedFact:
    return EncodedFact([n], [0], "x", "completion", None, {})


def test_queries_are_computed_once_per_fact_and_recomputed_after_eviction():
    facts = {o: _fact(o) for o in range(1, 6)}
    computed: list[int] = []

    def compute(batch):
        computed.extend(f.prompt_ids[0] for f in batch)
        return [torch.full((2, 3), float(f.prompt_ids[0])) for f in batch]

    read: list[int] = []

    def recall(owners):
        read.extend(owners)
        return [facts.get(o) for o in owners]

    queries = TurnQueries(compute, capacity=3)
    first = queries.of([1, 2, 3], recall)
    assert computed == [1, 2, 3] and sorted(first) == [1, 2, 3]
    assert float(first[2][0, 0]) == 2.0
    again = queries.of([2, 3], recall)
    assert computed == [1, 2, 3] and read == [1, 2, 3]  # kept: neither read nor computed
    assert torch.equal(again[3], first[3])
    queries.of([4], recall)  # over capacity: the least recently used (1) goes
    queries.of([1], recall)
    assert computed == [1, 2, 3, 4, 1]


def test_a_fact_that_is_gone_is_left_out():
    queries = TurnQueries(lambda batch: [torch.zeros(1, 3) for _ in batch])
    out = queries.of([7, 8], lambda owners: [_fact(7) if o == 7 else None for o in owners])
    assert list(out) == [7]
