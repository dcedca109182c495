"""Which stored facts' prompts hold a given token: where a new key may fire unseen.

A batch re-verifies the stored facts whose keys lie near its new ones (their gates move).
That misses a new key on a word that other prompts share: keyed on " within", one fact
fired on every "X is within" prompt, while those facts' own keys sat on their subjects, far
from it (reports/METHODS.md). Such a key fires where the same token appears, so the
memorizer looks up the stored facts whose prompts hold a new fact's key token and verifies
those a new expert actually fires on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from model.facts import EncodedFact, content_positions

RECALL_CHUNK = 256  # facts read back from the registry at once
# Query rows (one per turn token) kept for stored facts: 128 MiB at d_k 256 in fp32, about
# 10,000 facts of a dozen tokens; a fact looked up again after eviction is recomputed.
TURN_QUERY_ROWS_KEPT = 131_072


class StoredPrompts:
    """Which memorized facts' prompts (the user's tokens) hold each token: each fact is read
    from the registry once, and a lookup costs the facts found, not the store's size."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._read: set[int] = set()  # owners whose tokens are indexed
        self._holders: dict[int, set[int]] = {}  # token id -> owners whose prompt holds it

    def holding(self, tokens: set[int], owners: list[int],
                recall: Callable[[list[int]], list[EncodedFact | None]]) -> list[int]:
        """The owners among `owners` whose prompt holds any of `tokens`."""
        missing = [o for o in owners if o not in self._read]
        for start in range(0, len(missing), RECALL_CHUNK):
            chunk = missing[start:start + RECALL_CHUNK]
            for owner, fact in zip(chunk, recall(chunk)):
                if fact is None:  # not memorized (yet): looked up again next time
                    continue
                self._read.add(owner)
                for p in content_positions(fact, self.tokenizer):
                    self._holders.setdefault(fact.prompt_ids[p], set()).add(owner)
        found = set().union(*(self._holders.get(t, set()) for t in tokens))
        return sorted(found.intersection(owners))


class TurnQueries:
    """The router's queries at each stored fact's turn tokens, computed once and kept.

    The backbone below the memory layer and the router are frozen, so a stored prompt's
    queries never change: the check of where new keys fire then costs a matrix product per
    fact instead of a lower-layer forward per fact per batch (at 10,000 CounterFact facts a
    key token is held by ~29 stored prompts on average; see reports/METHODS.md).
    """

    def __init__(self, compute: Callable[[list[EncodedFact]], list[torch.Tensor]],
                 capacity_rows: int = TURN_QUERY_ROWS_KEPT) -> None:
        self.compute = compute  # facts -> their (n_turn_tokens, d_k) queries, in order
        self.capacity_rows = capacity_rows  # bounded in rows: a prompt may be long
        self._kept: OrderedDict[int, torch.Tensor] = OrderedDict()  # owner -> queries, LRU
        self._rows = 0

    def of(self, owners: list[int], recall: Callable[[list[int]], list[EncodedFact | None]]
           ) -> dict[int, torch.Tensor]:
        """Queries of each owner in `owners`; only those not kept are read back and computed
        (an owner whose fact is gone is left out)."""
        missing = [o for o in owners if o not in self._kept]
        found = [(o, f) for o, f in zip(missing, recall(missing) if missing else [])
                 if f is not None]
        if found:
            for (owner, _), queries in zip(found, self.compute([f for _, f in found])):
                self._kept[owner] = queries
                self._rows += len(queries)
        out = {}
        for owner in owners:
            if owner in self._kept:
                self._kept.move_to_end(owner)
                out[owner] = self._kept[owner]
        while self._rows > self.capacity_rows:  # `out` holds its own references
            _, evicted = self._kept.popitem(last=False)
            self._rows -= len(evicted)
        return out
