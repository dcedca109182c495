"""Which stored facts' prompts hold a given token: where a new key may fire unseen.

A batch re-verifies the stored facts whose keys lie near its new ones (their gates move).
That misses a new key on a word that other prompts share: keyed on " within", one fact
fired on every "X is within" prompt, while those facts' own keys sat on their subjects, far
from it (reports/METHODS.md). Such a key fires where the same token appears, so the
memorizer looks up the stored facts whose prompts hold a new fact's key token and verifies
those a new expert actually fires on.
"""

from __future__ import annotations

from collections.abc import Callable

from model.facts import EncodedFact, content_positions

RECALL_CHUNK = 256  # facts read back from the registry at once


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
