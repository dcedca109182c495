"""A fact's second key: what its question asks about its subject.

The subject key (one token's query) fires on every question about the fact's subject, so
"What is X's country of citizenship?" memorized also answered "Who is X's father?" (0.125
of such near misses kept the base answer on held-out zsRE, reports/METHODS.md). The second
key is the mean unit query over the question's words outside its guessed subject: the
relation it asks. An expert with a second key adds its value to a request only where the
request's own mean over the same words, less the firing token, matches it (cosine at least
the fact's threshold, carried in the key's norm as the subject gate's is, expert_gates.py).

Both sides find the words from token ids alone, with one function (`relation_positions`),
so the fact's own question matches its key (up to numerics and context): the memorizer
on the fact's prompt, the API process on each request's prompt (the engine gets the
positions with the request).
Both sides' means are compared through the router's relation map (model/relation_map.py),
learned so that rewordings of a relation match and other relations do not. Offline, on
generation outputs of finished runs, raw means kept 0.865 of held-out other-relation
questions unchanged for 12 points of rephrasings (reports/conjunction-offline); through the
map, 0.970 for 9 (reports/relation-bank-offline).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from model.subject_guess import guess_subject
from model.turn_scope import Marker, turn_words

# The key in a request's `SamplingParams.extra_args` carrying its relation word positions.
RELATION_KEY = "mome_relation"


def relation_positions(ids: Sequence[int], tokenizer, marker: Marker | None) -> list[int]:
    """The turn's word positions outside its guessed subject (all of them without one)."""
    special = set(tokenizer.all_special_ids)
    words = turn_words(ids, special, marker)
    if not words:
        return []
    pieces = [tokenizer.decode([ids[i]]) for i in words]
    ends = np.cumsum([len(p) for p in pieces])
    guessed = guess_subject("".join(pieces))
    if guessed is None:
        return words
    begins = ends - np.array([len(p) for p in pieces])
    outside = [w for w, a, b in zip(words, begins, ends)
               if not (a < guessed[1] and b > guessed[0])]
    return outside or words


def words_digest(ids: Sequence[int], positions: Sequence[int]) -> str:
    """Names what decides a request's second keys: its tokens through its last relation
    word (the layer's queries there depend on nothing after it, nor on any expert). The
    engine keeps relation-word sums by it, and the prefix cache's salt carries it."""
    if not len(positions):
        return ""
    tokens = np.asarray(ids[:int(max(positions)) + 1], dtype=np.int64)
    marks = np.asarray(positions, dtype=np.int64)
    return hashlib.blake2b(tokens.tobytes() + b"|" + marks.tobytes(), digest_size=12).hexdigest()


def unit_sum(units: dict[int, torch.Tensor]) -> torch.Tensor:
    """The unnormalized sum of a request's relation-word unit queries (by position): what
    the engine keeps per prompt, and what a firing's mean is taken from."""
    return torch.stack(list(units.values())).sum(0)


def mean_without(unit: torch.Tensor, leave_out: int | None = None) -> torch.Tensor:
    """Unit mean of unit queries (n, d_k), leaving out row `leave_out` when others remain."""
    rows = [i for i in range(len(unit)) if i != leave_out] or list(range(len(unit)))
    return torch.nn.functional.normalize(unit[rows].mean(0), dim=-1)


def relation_mean(prompt_ids: Sequence[int], raw: torch.Tensor, locus: int, tokenizer,
                  marker: Marker | None) -> torch.Tensor | None:
    """A fact prompt's relation mean, as its second key is taken: the unit mean of the
    router's queries `raw` (T, d_k) over its relation words, less the locus (None: no
    relation words)."""
    positions = relation_positions(prompt_ids, tokenizer, marker)
    if not positions:
        return None
    unit = torch.nn.functional.normalize(raw[positions], dim=-1)
    return mean_without(unit, positions.index(locus) if locus in positions else None)


def scaled_key(mean: torch.Tensor, threshold: float) -> torch.Tensor:
    """The stored second key: passes where cos(request mean, key) >= threshold, i.e. where
    the request's unit mean times the stored key reaches 1."""
    return mean / threshold


def passes(means: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per firing: whether it stays. `means` (n, d_k) unit request means (NaN where unknown),
    `keys` (n, d_k) the experts' second keys (zero: none, always stays)."""
    none = keys.abs().sum(-1) == 0
    unknown = torch.isnan(means).any(-1)
    return none | unknown | ((torch.nan_to_num(means) * keys).sum(-1) >= 1.0)
