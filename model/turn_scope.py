"""Which tokens may fire experts: those of the turn being answered.

A fact applies to the question being asked, not to the conversation's history. In a chat
prompt the turn being answered starts at the last "<|im_start|>user" marker; every token
before it (the system turn, earlier questions and answers) is out of scope, so an expert
keyed on a question asked three turns ago does not fire again on every later request.
Completion prompts have no marker: all of their tokens are in scope, as are generated ones.

The serving engine knows each scheduled request's prompt, so it masks by position: the
tokens before the prompt's last marker (`scope_start`) are out (`after_turn_starts`).
The token ids of a chunk alone do not say this when chunked prefill splits a prompt: a
first chunk may hold an earlier turn's marker but not the last one, a middle chunk no
marker at all. `in_scope`, the rule on token ids, is exact for whole sequences (the
trainer's batches) and is the engine's fallback outside a scheduled step. The prefix
cache is salted with `scope_start` (server/engine.py) so KV computed under another scope
is never reused.

Within that turn the router reads the states of the turn asked alone (`alone_prompt`): a
history moves the states at a question's words enough that a key can miss its own question
asked later in a conversation (model/memory_layer.py, TurnView).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

Marker = tuple[int, int]


@functools.lru_cache(maxsize=8)  # one template render per tokenizer, not one per fact
def user_turn_marker(tokenizer) -> Marker | None:
    """The two tokens that open a user turn in the chat template ("<|im_start|>", "user")."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True,
                                        return_dict=False, add_generation_prompt=False)
    specials = set(tokenizer.all_special_ids)
    openers = [i for i, t in enumerate(ids[:-1])
               if t in specials and tokenizer.decode([ids[i + 1]]).strip() == "user"]
    return (int(ids[openers[-1]]), int(ids[openers[-1] + 1])) if openers else None


def _marker_starts(ids: np.ndarray, marker: Marker) -> np.ndarray:
    return np.nonzero((ids[:-1] == marker[0]) & (ids[1:] == marker[1]))[0]


def scope_start(ids: Sequence[int], marker: Marker | None) -> int:
    """Index of the last user-turn marker in one sequence (0 without one)."""
    if marker is None or len(ids) < 2:
        return 0
    found = _marker_starts(np.asarray(ids), marker)
    return int(found[-1]) if len(found) else 0


class AlonePrompt(NamedTuple):
    """A conversation's last user turn as if asked alone: `ids` are the tokens before its
    first user turn (the system turn, as the chat template writes it) followed by the last
    user turn, from its marker through its words. That turn is tokens [turn_start,
    turn_end) of the conversation and [at, len(ids)) of `ids`."""

    ids: list[int]
    turn_start: int
    at: int

    @property
    def turn_end(self) -> int:
        return self.turn_start + len(self.ids) - self.at


def alone_prompt(ids: Sequence[int], marker: Marker | None, special: set[int]
                 ) -> AlonePrompt | None:
    """The last user turn of `ids` (a prompt, or a prompt and its answer) as if asked alone;
    None when nothing but the system turn comes before it (the prompt is its own alone view).
    The turn ends before the special token closing its words ("<|im_end|>"): what follows
    (the assistant's header, its answer) keeps its own states, so the view depends only on
    the turn's own tokens and those before it, never on where a prompt ends."""
    if marker is None or len(ids) < 2:
        return None
    found = _marker_starts(np.asarray(ids), marker)
    if len(found) < 2:
        return None
    first, last = int(found[0]), int(found[-1])
    end = next((i for i in range(last + 2, len(ids)) if ids[i] in special), len(ids))
    return AlonePrompt([int(t) for t in ids[:first]] + [int(t) for t in ids[last:end]], last, first)


def turn_words(ids: Sequence[int], special: set[int], marker: Marker | None) -> list[int]:
    """Positions of the words of the turn being answered: in a chat prompt, the last user
    turn after "<|im_start|>user" up to the next special token ("<|im_end|>"; the newline
    after the role is counted, as the router always saw it); without a marker in the
    prompt (a completion), every non-special token. A fact's locus candidates and a
    request's relation words are both taken from here."""
    ids = list(ids)
    start = scope_start(ids, marker)
    if marker is None or len(ids) < start + 2 or (ids[start], ids[start + 1]) != marker:
        return [i for i, t in enumerate(ids) if t not in special]
    first = start + 2
    end = next((i for i in range(first, len(ids)) if ids[i] in special), len(ids))
    return list(range(first, end))


def in_scope(ids: torch.Tensor, segment_starts: Sequence[int], marker: Marker | None
             ) -> torch.Tensor | None:
    """Per token of the flat `ids` (N,), whether it may fire; `segment_starts`: where each
    sequence's chunk starts in `ids`. None when every token may (no marker anywhere)."""
    if marker is None or ids.numel() < 2:
        return None
    flat = ids.detach().reshape(-1).cpu().numpy()
    found = _marker_starts(flat, marker)
    if not len(found):
        return None
    mask = np.ones(len(flat), dtype=bool)
    bounds = sorted({int(s) for s in segment_starts if 0 <= s < len(flat)} | {0})
    ends = bounds[1:] + [len(flat)]
    for start, end in zip(bounds, ends):
        # The last marker of this chunk (a marker spans two tokens, both in the chunk).
        last = np.searchsorted(found, end - 1) - 1
        if last >= 0 and found[last] >= start:
            mask[start:found[last]] = False
    return torch.from_numpy(mask).to(ids.device)


def after_turn_starts(positions: torch.Tensor, segment_starts: Sequence[int],
                      turn_starts: Sequence[int]) -> torch.Tensor | None:
    """Per token of a flat batch, whether it may fire: its absolute position is at or after
    its sequence's turn start (`turn_starts[i]` for the chunk at `segment_starts[i]`).
    None when every token may (no sequence has an earlier turn)."""
    if not any(turn_starts):
        return None
    flat = positions.reshape(-1)
    bound = torch.zeros_like(flat)
    ends = list(segment_starts[1:]) + [len(flat)]
    for start, end, turn in zip(segment_starts, ends, turn_starts):
        bound[start:end] = turn
    return flat >= bound


def in_scope_rows(ids: torch.Tensor, marker: Marker | None) -> torch.Tensor | None:
    """`in_scope` for a padded batch (B, T) of whole sequences, as a (B, T) mask."""
    if ids.ndim == 1:
        ids = ids[None]
    B, T = ids.shape
    mask = in_scope(ids.reshape(-1), range(0, B * T, T), marker)
    return None if mask is None else mask.reshape(B, T)
