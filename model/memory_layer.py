"""The memory-expert layer: per token, route the hidden state to experts and add their values.

One implementation of the math, attached to a finished backbone (transformers' or vLLM's
Llama) by a forward hook on one decoder layer, so the checkpoint's weights and names stay as
they are.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from expert_store.device_cache import DeviceCache
from expert_store.store import ExpertStore
from model.config import MemoryConfig
from model.relation_key import passes, unit_sum
from model.router import Router
from model.turn_scope import Marker


@dataclass
class TurnView:
    """Rows of a flat batch whose router input is not their own state: the prompt tokens of
    a turn that follows earlier ones, read as if the turn were asked alone (model/turn_scope.py,
    `alone_prompt`). A history moves the states at a question's words; it still shapes the
    answer, through the values added to the prompt's own stream and the layers above."""

    rows: torch.Tensor  # (n,) flat rows
    states: torch.Tensor  # (n, d_model) their states asked alone

    def applied_to(self, h: torch.Tensor) -> torch.Tensor:
        """The flat stream h with these rows replaced, in fp32 (the router's precision)."""
        return h.float().index_copy(0, self.rows.to(h.device), self.states.to(h.device))


@dataclass
class RequestWords:
    """One request's part of a call, for second keys (model/relation_key.py).

    `start`, `end`: its rows of the flat batch. `rows`, `positions`: the relation words this
    call computes (flat rows, and their positions in the request). `earlier`: unit queries
    of its relation words computed in earlier calls (a prefill split by chunked prefill),
    by position. `total`: its relation words in all. `known`: the unnormalized sum of their
    unit queries, when a call before (or an identical prompt's) computed all of them. A
    request whose sum is neither known nor completed here fires on subject keys alone."""

    start: int
    end: int
    total: int = 0
    rows: np.ndarray | None = None
    positions: np.ndarray | None = None
    earlier: dict[int, torch.Tensor] = field(default_factory=dict)
    known: torch.Tensor | None = None


class MemoryLayer(torch.nn.Module):
    def __init__(self, cfg: MemoryConfig, router: Router, store: ExpertStore,
                 cache_slots: int = 65_536, device: str | torch.device = "cpu",
                 turn_marker: Marker | None = None):
        super().__init__()
        assert router.d_k == store.cfg.d_k, "router and store disagree on d_k"
        self.cfg = cfg
        self.router = router.to(device)
        self.store = store
        self.cache = DeviceCache(store, cache_slots, device=device)
        self.turn_marker = turn_marker  # see model/turn_scope.py
        # The serving model reads each call's firings back to name them per request
        # (model/fired_log.py); the trainer does not, and leaves this off.
        self.record_fired = False
        # Set by the model's forward for the hook below: which tokens of the next call may
        # fire (per thread: the reference model generates in more than one).
        self._pending = threading.local()

    def set_scope(self, scope: torch.Tensor | None) -> None:
        self._pending.scope = scope

    def take_scope(self) -> torch.Tensor | None:
        scope = getattr(self._pending, "scope", None)
        self._pending.scope = None
        return scope

    def set_view(self, view: TurnView | None) -> None:
        self._pending.view = view

    def take_view(self) -> TurnView | None:
        view = getattr(self._pending, "view", None)
        self._pending.view = None
        return view

    def set_words(self, words: list[RequestWords] | None) -> None:
        self._pending.words = words

    def take_units(self) -> dict[int, dict[int, torch.Tensor]]:
        """Per request of the last call's `set_words` list (by index) that computed relation
        words: the unit queries of all of them known so far (`earlier` and this call's), by
        position."""
        units = getattr(self._pending, "units", None) or {}
        self._pending.units = None
        return units

    def take_fired(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The last call's firings (token rows, expert ids) when `record_fired` is on."""
        fired = getattr(self._pending, "fired", None)
        self._pending.fired = None
        return fired

    def refresh(self) -> bool:
        """Pick up the store's committed writes (from this or another process)."""
        changed = self.store.refresh()
        return self.cache.refresh() or changed

    def route(self, h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores D (T, k) and expert ids I (T, k) of the experts that pass the gate (-1 else)."""
        q = self.router(h).detach().cpu().numpy()
        D, I = self.store.search(q, self.cfg.top_k)
        I = np.where(D >= self.cfg.gate, I, -1)
        return D, I

    def forward(self, h: torch.Tensor, exclude: np.ndarray | None = None,
                scope: torch.Tensor | None = None, routed: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Delta (T, d_model) to add to hidden states h (T, d_model).

        `exclude`: stored experts to leave out (those being retrained: their trainable copy
        is added by the trainer instead). `scope` (T,): the tokens that may fire (all if None).
        `routed` (T, d_model): the states the router reads, where they are not h (the turn
        being answered as if asked alone, `TurnView`); the values are added to h.
        """
        assert h.ndim == 2, f"expected (tokens, d_model), got {tuple(h.shape)}"
        assert routed is None or routed.shape == h.shape, "routed states must match h"
        delta = torch.zeros_like(h)
        read = h if routed is None else routed  # what the router reads; values go to h
        if not len(self.store):
            return delta
        # Tokens out of scope (the system turn, earlier turns) never fire: only the rest are
        # searched, the layer's main cost with a large store.
        assert scope is None or scope.numel() == len(h), "scope must mark every token of h"
        live = None if scope is None else np.flatnonzero(scope.reshape(-1).cpu().numpy())
        rows = ids = np.zeros(0, dtype=np.int64)
        if live is None or len(live):
            _, I = self.route(read if live is None else read[torch.from_numpy(live).to(h.device)])
            if exclude is not None and len(exclude):
                I = np.where(np.isin(I, exclude), -1, I)
            rows, cols = np.nonzero(I >= 0)
            ids = I[rows, cols]
            if live is not None:
                rows = live[rows]
        words = getattr(self._pending, "words", None)
        self._pending.words = None
        if words:
            rows, ids = self.second_keys(read, rows, ids, words)
        if self.record_fired:
            self._pending.fired = (rows, ids)
        if len(rows):
            values = self.cache.lookup(ids).to(h.dtype)
            delta.index_add_(0, torch.from_numpy(rows).to(h.device), values)
        return delta

    def second_keys(self, h: torch.Tensor, rows: np.ndarray, ids: np.ndarray,
                    words: list[RequestWords]) -> tuple[np.ndarray, np.ndarray]:
        """The firings (flat rows, expert ids) whose experts' second keys match their
        request's relation words, less the firing token (model/relation_key.py)."""
        units, sums, own = {}, {}, {}  # by request: all units so far, their sum, this call's
        for i, w in enumerate(words):
            if w.rows is not None and len(w.rows):
                found = torch.nn.functional.normalize(
                    self.router(h[torch.from_numpy(w.rows).to(h.device)]).float(), dim=-1
                ).detach().cpu()
                units[i] = {**w.earlier, **dict(zip(w.positions.tolist(), found))}
                own[i] = dict(zip(w.rows.tolist(), found))
            if w.known is not None:
                sums[i] = w.known
            elif i in units and len(units[i]) == w.total:
                sums[i] = unit_sum(units[i])
        self._pending.units = units
        if not len(rows):
            return rows, ids
        second = torch.from_numpy(self.store.read_relations(ids))
        # Only firings of experts with a second key need their request's mean (`passes` keeps
        # the rest): a large store's keyless experts can fire on many tokens of a step.
        with_key = np.flatnonzero(second.abs().sum(-1).numpy() != 0)
        if not len(with_key):
            return rows, ids
        starts = np.array([w.start for w in words])
        owner = np.searchsorted(starts, rows, side="right") - 1
        totals = torch.full(second.shape, float("nan"))  # NaN: not known, subject key only
        for j in with_key.tolist():
            row, i = int(rows[j]), int(owner[j])
            if i < 0 or row >= words[i].end or i not in sums:
                continue  # padding, or a request whose words are not known
            leave_out = row in own.get(i, {}) and words[i].total > 1  # the firing token
            totals[j] = sums[i] - own[i][row] if leave_out else sums[i]
        means = totals.clone()
        # Each through the map its expert's key was taken through (model/router.py).
        maps = torch.from_numpy(self.store.read_relation_maps(ids[with_key]).astype(np.int64))
        means[with_key] = self.router.relation_view(
            totals[with_key].to(self.router.mean.device), maps).cpu()
        keep = passes(means, second).numpy()
        return rows[keep], ids[keep]


def attach_memory(decoder_layer: torch.nn.Module, memory: MemoryLayer) -> torch.utils.hooks.RemovableHandle:
    """Add the memory layer's output to a decoder layer's output (transformers or vLLM Llama)."""

    def hook(_module, _inputs, output):
        if not len(memory.store):
            return output  # nothing can fire: skip the per-token work entirely
        if isinstance(output, tuple):  # vLLM: (mlp output, residual); the stream is their sum
            hidden, residual = output[0], output[1]
            stream = hidden + residual
            shape = stream.shape
            delta = _delta(memory, stream.reshape(-1, shape[-1]))
            return (hidden + delta.reshape(shape), residual, *output[2:])
        shape = output.shape  # transformers: the residual stream itself, (B, T, d)
        delta = _delta(memory, output.reshape(-1, shape[-1]))
        return output + delta.reshape(shape)

    return decoder_layer.register_forward_hook(hook)


def _delta(memory: MemoryLayer, flat: torch.Tensor) -> torch.Tensor:
    """The memory layer's output for one call's flat stream, under the pending scope and view."""
    view = memory.take_view()
    return memory(flat, scope=memory.take_scope(),
                  routed=None if view is None else view.applied_to(flat))
