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

    queries = TurnQueries(compute, capacity_rows=6)  # three facts of two rows each
    first = queries.of([1, 2, 3], recall)
    assert computed == [1, 2, 3] and sorted(first) == [1, 2, 3]
    assert float(first[2][0, 0]) == 2.0
    again = queries.of([1, 3], recall)
    assert computed == [1, 2, 3] and read == [1, 2, 3]  # kept: neither read nor computed
    assert torch.equal(again[3], first[3])
    queries.of([4], recall)  # over capacity: the least recently used (2, not 1) goes
    queries.of([1, 3], recall)
    assert computed == [1, 2, 3, 4]
    queries.of([2], recall)
    assert computed == [1, 2, 3, 4, 2]


def test_a_lookup_larger_than_the_capacity_is_answered_whole_and_not_kept_whole():
    queries = TurnQueries(lambda batch: [torch.zeros(2, 3) for _ in batch], capacity_rows=4)
    out = queries.of([1, 2, 3, 4], lambda owners: [_fact(o) for o in owners])
    assert sorted(out) == [1, 2, 3, 4]
    assert len(queries._kept) == 2 and queries._rows == 4


def test_a_fact_that_is_gone_is_left_out():
    queries = TurnQueries(lambda batch: [torch.zeros(1, 3) for _ in batch])
    out = queries.of([7, 8], lambda owners: [_fact(7) if o == 7 else None for o in owners])
    assert list(out) == [7]
