"""Training of the experts of a batch of facts, with the backbone and the router frozen.

Only the value vectors of the facts' new experts are parameters; everything else is
computed once per batch (the layers below the memory layer, the queries, the gate pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.config import TrainConfig
from model.facts import EncodedFact
from model.memory_layer import MemoryLayer
from model.reference import ReferenceModel, UpperLayers, right_padded
from model.turn_scope import in_scope_rows

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    values: torch.Tensor  # (E, d_model) trained expert values
    steps: int
    loss: list[float]  # final loss per fact
    margin: list[float]  # final smallest logit margin over each fact's answer tokens
    # Per fact: the step its expert stopped training at (`steps` for one that never did).
    expert_steps: list[int] = field(default_factory=list)


def optimizer_for(expert_values: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The only parameters memorization ever updates: the new experts' values."""
    return torch.optim.Adam([{"params": expert_values, "lr": cfg.lr}],
                            betas=(cfg.adam_beta1, cfg.adam_beta2))


def _answer_targets(facts: list[EncodedFact]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per fact: positions whose next-token prediction is an answer token, and those tokens."""
    out = []
    for f in facts:
        start = len(f.prompt_ids) - 1
        positions = torch.arange(start, start + len(f.answer_ids))
        out.append((positions, torch.tensor(f.answer_ids)))
    return out


def train_facts(ref: ReferenceModel, memory: MemoryLayer, facts: list[EncodedFact],
                keys: torch.Tensor, cfg: TrainConfig, init_values: torch.Tensor | None = None,
                max_steps: int | None = None, views: list[EncodedFact] = (),
                stored_ids: np.ndarray | None = None) -> TrainResult:
    """Train values for experts with `keys` (E, d_k), one per fact.

    `views` are the facts in other contexts: their loss is trained too wherever an expert
    fires in them, and training stops once every fact clears the margin and every such view
    answers right by more than `cfg.view_margin` (or at max_steps). With `cfg.dtype`
    bfloat16, steps run in a bfloat16 copy of the upper layers; once every row clears there,
    every row is checked in float32 and trained on there where short (out of steps in
    bfloat16, a float32 forward only reports the margins). `stored_ids`:
    the experts' ids when they are already in the store (a retry), so that the served copy
    is not counted twice.

    With `cfg.views_after_facts`, the facts train alone first and the views join only then:
    a step over the fact's row alone costs about half of one over both (every row is a
    forward and backward pass through the layers above the memory layer), and where a view
    already answers it costs one forward.
    """
    limit = max_steps or cfg.max_steps
    if not (views and cfg.views_after_facts):
        return _train(ref, memory, facts, keys, cfg, init_values, limit, views, stored_ids)
    alone = _train(ref, memory, facts, keys, cfg, init_values, limit, (), stored_ids)
    if alone.steps >= limit:
        return alone
    both = _train(ref, memory, facts, keys, cfg, alone.values,
                  limit - alone.steps, views, stored_ids)
    return TrainResult(both.values, alone.steps + both.steps, both.loss, both.margin,
                       [a + b for a, b in zip(alone.expert_steps, both.expert_steps)])


def _gate_pattern(memory: MemoryLayer, ids: torch.Tensor, h_routed: torch.Tensor,
                  keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, E) 1.0 where expert e passes its gate at a token, in the turn being answered
    only, as served (model/turn_scope.py); and that scope (B, T), None when all is in it.
    `h_routed`: the states the router reads (`ReferenceModel.routed`)."""
    B, T = ids.shape
    with torch.no_grad():
        gate = (memory.router(h_routed.reshape(B * T, -1)) @ keys.T >= memory.cfg.gate)
        gate = gate.float().reshape(B, T, -1)
        scope = in_scope_rows(ids, memory.turn_marker)
        if scope is not None:
            gate = gate * scope[..., None]
    return gate, scope


def fires_in(ref: ReferenceModel, memory: MemoryLayer, rows: list[EncodedFact],
             keys: torch.Tensor) -> torch.Tensor:
    """(rows, E) bool: whether the expert with `keys[e]` fires anywhere in row b (its prompt
    and answer, in the turn being answered)."""
    ids = right_padded([row.ids for row in rows], ref.tokenizer.eos_token_id)
    h_pre, _ = ref.lower(ids)
    gate, _ = _gate_pattern(memory, ids, ref.routed(ids, h_pre), keys)
    real = torch.arange(ids.shape[1])[None, :] < torch.tensor([len(r.ids) for r in rows])[:, None]
    return (gate.bool() & real[..., None]).any(1)


def _train(ref: ReferenceModel, memory: MemoryLayer, facts: list[EncodedFact],
           keys: torch.Tensor, cfg: TrainConfig, init_values: torch.Tensor | None,
           max_steps: int, views, stored_ids: np.ndarray | None) -> TrainResult:
    rows = list(facts) + list(views)
    ids = right_padded([row.ids for row in rows], ref.tokenizer.eos_token_id)
    h_pre, cached = ref.lower(ids)  # (B, T, d)
    h_routed = ref.routed(ids, h_pre)
    gate, scope = _gate_pattern(memory, ids, h_routed, keys)
    with torch.no_grad():
        B, T = ids.shape
        # A view in which no expert fires cannot be changed: leave it out.
        keep = [b for b in range(B) if b < len(facts) or bool(gate[b].any())]
        rows = [rows[b] for b in keep]
        h_pre, h_routed, gate = h_pre[keep], h_routed[keep], gate[keep]
        scope = scope[keep].reshape(-1) if scope is not None else None
        positions, rope = cached
        cached = (positions[keep], (rope[0][keep], rope[1][keep]))
        B = len(rows)
        flat = h_pre.reshape(B * T, -1)
        # Committed experts, as served, but for the ones being trained.
        h_base = (flat + memory(flat, exclude=stored_ids, scope=scope,
                                routed=h_routed.reshape(B * T, -1))).reshape(B, T, -1)
        # A fact's own expert fires at its locus (the key is that query); positions before
        # the first one any new expert fires at never change: they run once, not per step.
        groups = [_Group(members, first, rows, h_base, cached)
                  for members, first in _by_first_firing(gate, rows)]
    values = (init_values.clone() if init_values is not None
              else torch.zeros(len(keys), h_pre.shape[-1]))
    values.requires_grad_(True)
    optimizer = optimizer_for([values], cfg)
    targets = _answer_targets(rows)
    n = len(facts)  # fact b owns expert b; rows after them are views
    # The passes above the memory layer: in cfg.dtype first; values that clear there are
    # checked, and trained on where short, in float32, the precision they are served in.
    passes = [ref.upper_in(dtype) for dtype in dict.fromkeys([_DTYPES[cfg.dtype], torch.float32])]
    upper = passes.pop(0)
    for group in groups:
        group.run_in(upper, h_base, cached)

    def cleared(b: int) -> bool:
        return margins[b] >= cfg.margin if b < n else margins[b] > cfg.view_margin

    # An expert stops once every row it fires in (its fact, the fact's views, a colliding
    # fact) clears, and keeps its value; a row stops once all experts firing in it have.
    # Otherwise every fact of a batch trains, and is computed, as long as the slowest one.
    fires = gate.any(1)  # (B, E)
    rows_of = [set(fires[:, e].nonzero().flatten().tolist()) | {e} for e in range(n)]
    experts_in = [set(fires[b].nonzero().flatten().tolist()) | ({b} if b < n else set())
                  for b in range(B)]
    losses, margins = [float("inf")] * B, [float("-inf")] * B
    active, frozen = set(range(B)), {}
    frozen_at: dict[int, int] = {}
    steps, checked_at = 0, -1  # checked_at: the forward that was the float32 check
    kept_at: dict[int, int] = {}  # the steps experts froze at before the check

    def forward() -> dict[int, torch.Tensor]:
        """Each active row's loss; every forwarded row's margin and loss are recorded."""
        row_loss = {}
        for group in groups:
            batch = group.active_rows(active, targets, h_base, gate, cached)
            if batch is None:
                continue
            h = batch.h_base + batch.gate @ values
            logits = (upper.upper_suffix(h, batch.cached, group.split, batch.prefix, at=batch.at)
                      if group.prefix is not None else upper.upper(h, batch.cached, at=batch.at))
            for j, b in enumerate(batch.rows):
                fact_logits = logits[batch.spans[j]]  # (A, vocab)
                answer = targets[b][1]
                row_loss[b] = torch.nn.functional.cross_entropy(fact_logits, answer)
                with torch.no_grad():
                    right = fact_logits.gather(1, answer[:, None])[:, 0]
                    wrong = fact_logits.scatter(1, answer[:, None], float("-inf")).max(1).values
                    margins[b] = float((right - wrong).min())
                losses[b] = row_loss[b].item()
        return row_loss

    def check_in_float32() -> None:
        # Every row again, in the precision served. Experts frozen so far train again where
        # a row of theirs falls short (Adam's moments carry on as they are).
        nonlocal upper, active, frozen, frozen_at, kept_at
        upper = passes.pop(0)
        for group in groups:
            group.run_in(upper, h_base, cached)
        active, frozen = set(range(B)), {}
        kept_at, frozen_at = frozen_at, {}

    while steps < max_steps:
        steps += 1
        row_loss = forward()
        if all(cleared(b) for b in range(B)):
            if not passes:
                if steps == checked_at:  # all cleared in the check: as they froze before it
                    frozen_at = kept_at
                break
            check_in_float32()  # this forward is not a step: nothing was updated since
            checked_at = steps
            steps -= 1
            continue
        for e in range(n):
            if e not in frozen and all(cleared(b) for b in rows_of[e]):
                frozen[e] = values[e].detach().clone()
                # An expert that clears in the float32 check keeps the step it froze at.
                frozen_at[e] = kept_at.get(e, steps) if steps == checked_at else steps
        active = {b for b in active if not experts_in[b] <= frozen.keys()}
        optimizer.zero_grad()
        sum(row_loss[b] for b in active).backward()
        optimizer.step()
        with torch.no_grad():  # Adam's momentum would still move a frozen expert
            for e, value in frozen.items():
                values[e] = value
    if passes:  # out of steps before clearing in cfg.dtype: report float32's margins
        check_in_float32()
        with torch.no_grad():
            forward()
    expert_steps = [frozen_at.get(e, steps) for e in range(n)]
    return TrainResult(values.detach(), steps, losses[:n], margins[:n], expert_steps)


# Rows whose first firing positions lie within this many tokens share one batch; farther
# apart (a fact and its view behind an earlier exchange), each pays only for its own suffix.
GROUP_SLACK = 8


def _first_firing(gate: torch.Tensor, rows: list[EncodedFact]) -> list[int]:
    fires = gate.any(-1)  # (B, T)
    return [int(fires[b].float().argmax()) if fires[b].any() else len(f.prompt_ids) - 1
            for b, f in enumerate(rows)]


def _by_first_firing(gate: torch.Tensor, rows: list[EncodedFact]
                     ) -> list[tuple[list[int], int]]:
    """Groups of rows, each with the earliest position any of its experts fires at."""
    first = _first_firing(gate, rows)
    groups: list[tuple[list[int], int]] = []
    for b in sorted(range(len(rows)), key=lambda b: first[b]):
        if groups and first[b] - groups[-1][1] <= GROUP_SLACK:
            groups[-1][0].append(b)
        else:
            groups.append(([b], first[b]))
    return groups


class _Group:
    """Rows trained as one batch from a common split: the attention keys/values of the
    positions before it, in the layers above the memory layer, are computed once per
    precision the rows run in (`run_in`)."""

    def __init__(self, members: list[int], first: int, rows, h_base, cached):
        self.members = sorted(members)
        self.split = min(first, min(len(rows[b].prompt_ids) for b in self.members) - 1)
        self.prefix = None
        self._batch: _ActiveRows | None = None

    def run_in(self, upper: UpperLayers, h_base, cached) -> None:
        idx = torch.tensor(self.members)
        positions, rope = cached
        sub = (positions[idx], (rope[0][idx], rope[1][idx]))
        self.prefix = upper.upper_prefix(h_base[idx], sub, self.split) if self.split > 0 else None
        self._batch = None

    def active_rows(self, active: set[int], targets, h_base, gate, cached) -> _ActiveRows | None:
        rows = [b for b in self.members if b in active]
        if not rows:
            return None
        if self._batch is None or self._batch.rows != rows:  # built again when a row leaves
            local = [self.members.index(b) for b in rows]
            self._batch = _ActiveRows(rows, local, targets, h_base, gate, cached, self.prefix,
                                      self.split)
        return self._batch


class _ActiveRows:
    """The per-batch tensors of the rows still training, and where their answers are."""

    def __init__(self, active: list[int], local: list[int], targets, h_base, gate, cached,
                 prefix, split: int):
        self.rows = active
        idx = torch.tensor(active)
        # Positions after the last one that predicts an answer token are never needed.
        end = max(int(targets[b][0][-1]) for b in active) + 1
        self.h_base, self.gate = h_base[idx, split:end], gate[idx, split:end]
        positions, rope = cached
        positions, rope = positions[idx], (rope[0][idx], rope[1][idx])
        self.prefix = prefix.rows(torch.tensor(local)) if prefix is not None else None
        self.cached = (positions[:, :end], (rope[0][:, :end], rope[1][:, :end]))
        rows = torch.cat([torch.full((len(targets[b][0]),), j) for j, b in enumerate(active)])
        times = torch.cat([targets[b][0] - split for b in active])
        self.at = (rows, times)
        ends = torch.tensor([len(targets[b][0]) for b in active]).cumsum(0).tolist()
        self.spans = [slice(e - len(targets[b][0]), e) for e, b in zip(ends, active)]
