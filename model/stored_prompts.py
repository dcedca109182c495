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
    """The user's tokens of each memorized fact's prompt, read once per owner and kept."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._tokens: dict[int, frozenset[int]] = {}

    def holding(self, tokens: set[int], owners: list[int],
                recall: Callable[[list[int]], list[EncodedFact | None]]) -> list[int]:
        """The owners among `owners` whose prompt holds any of `tokens`."""
        missing = [o for o in owners if o not in self._tokens]
        for start in range(0, len(missing), RECALL_CHUNK):
            chunk = missing[start:start + RECALL_CHUNK]
            for owner, fact in zip(chunk, recall(chunk)):
                if fact is not None:  # not memorized (yet): looked up again next time
                    self._tokens[owner] = frozenset(
                        fact.prompt_ids[p] for p in content_positions(fact, self.tokenizer))
        return [o for o in owners if self._tokens.get(o, frozenset()) & tokens]
