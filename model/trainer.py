"""Training of the experts of a batch of facts, with the backbone and the router frozen.

Only the value vectors of the facts' new experts are parameters; everything else is
computed once per batch (the layers below the memory layer, the queries, the gate pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.config import TrainConfig
from model.facts import EncodedFact
from model.memory_layer import MemoryLayer
from model.reference import ReferenceModel, rows_of


@dataclass
class TrainResult:
    values: torch.Tensor  # (E, d_model) trained expert values
    steps: int
    loss: list[float]  # final loss per fact
    margin: list[float]  # final smallest logit margin over each fact's answer tokens


def optimizer_for(expert_values: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The only parameters memorization ever updates: the new experts' values."""
    return torch.optim.Adam([{"params": expert_values, "lr": cfg.lr}])


def _pad(facts: list[EncodedFact], pad_id: int) -> torch.Tensor:
    width = max(len(f.ids) for f in facts)
    return torch.tensor([f.ids + [pad_id] * (width - len(f.ids)) for f in facts])


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
    answers right (or at max_steps). `stored_ids`: the experts' ids when they are already
    in the store (a retry), so that the served copy is not counted twice.
    """
    rows = list(facts) + list(views)
    ids = _pad(rows, ref.tokenizer.eos_token_id)
    h_pre, cached = ref.lower(ids)  # (B, T, d)
    with torch.no_grad():
        B, T = ids.shape
        gate = (memory.router(h_pre.reshape(B * T, -1)) @ keys.T >= memory.cfg.gate)
        gate = gate.float().reshape(B, T, -1)
        # A view in which no expert fires cannot be changed: leave it out.
        keep = [b for b in range(B) if b < len(facts) or bool(gate[b].any())]
        rows = [rows[b] for b in keep]
        h_pre, gate = h_pre[keep], gate[keep]
        positions, rope = cached
        cached = (positions[keep], (rope[0][keep], rope[1][keep]))
        B = len(rows)
        flat = h_pre.reshape(B * T, -1)
        # Committed experts, as served, but for the ones being trained.
        h_base = (flat + memory(flat, exclude=stored_ids)).reshape(B, T, -1)
        # A fact's own expert fires at its locus (the key is that query); positions before
        # the first one any new expert fires at never change.
        fires = gate.any(-1)  # (B, T)
        split = int(fires.float().argmax(1)[fires.any(1)].min()) if fires.any() else T - 1
        split = min(split, min(len(f.prompt_ids) for f in rows) - 1)
        prefix = ref.upper_prefix(h_base, cached, split) if split > 0 else None
    values = (init_values.clone() if init_values is not None
              else torch.zeros(len(keys), h_pre.shape[-1]))
    values.requires_grad_(True)
    optimizer = optimizer_for([values], cfg)
    targets = _answer_targets(rows)
    n = len(facts)  # fact b owns expert b; rows after them are views

    def cleared(b: int) -> bool:
        return margins[b] >= cfg.margin if b < n else margins[b] > 0

    # A fact that clears its margin leaves the batch and its expert stays as it is: otherwise
    # every fact trains as long as the slowest one. (With views, all rows train to the end.)
    drop_cleared = len(rows) == n
    losses, margins = [float("inf")] * B, [float("-inf")] * B
    active, frozen = list(range(B)), {}
    steps, batch = 0, None
    for step in range(1, (max_steps or cfg.max_steps) + 1):
        steps = step
        if batch is None:
            batch = _ActiveRows(active, targets, h_base, gate, cached, prefix, split)
        h = batch.h_base + batch.gate @ values
        logits = (ref.upper_suffix(h, batch.cached, split, batch.prefix, at=batch.at)
                  if prefix is not None else ref.upper(h, batch.cached, at=batch.at))
        total = 0.0
        for j, b in enumerate(active):
            fact_logits = logits[batch.spans[j]]  # (A, vocab)
            answer = targets[b][1]
            loss = torch.nn.functional.cross_entropy(fact_logits, answer)
            with torch.no_grad():
                right = fact_logits.gather(1, answer[:, None])[:, 0]
                wrong = fact_logits.scatter(1, answer[:, None], float("-inf")).max(1).values
                margins[b] = float((right - wrong).min())
            losses[b] = loss.item()
            if not (drop_cleared and cleared(b)):
                total = total + loss
        if all(cleared(b) for b in range(B)):
            break
        if drop_cleared:
            for b in [b for b in active if cleared(b)]:
                frozen[b] = values[b].detach().clone()
                active.remove(b)
                batch = None
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        with torch.no_grad():  # Adam's momentum would still move a frozen expert
            for b, value in frozen.items():
                values[b] = value
    return TrainResult(values.detach(), steps, losses[:n], margins[:n])


class _ActiveRows:
    """The per-batch tensors of the rows still training, and where their answers are."""

    def __init__(self, active: list[int], targets, h_base, gate, cached, prefix, split: int):
        idx = torch.tensor(active)
        # Positions after the last one that predicts an answer token are never needed.
        end = max(int(targets[b][0][-1]) for b in active) + 1
        self.h_base, self.gate = h_base[idx, split:end], gate[idx, split:end]
        (positions, rope), self.prefix = rows_of(cached, prefix, idx)
        self.cached = (positions[:, :end], (rope[0][:, :end], rope[1][:, :end]))
        rows = torch.cat([torch.full((len(targets[b][0]),), j) for j, b in enumerate(active)])
        times = torch.cat([targets[b][0] - split for b in active])
        self.at = (rows, times)
        ends = torch.tensor([len(targets[b][0]) for b in active]).cumsum(0).tolist()
        self.spans = [slice(e - len(targets[b][0]), e) for e, b in zip(ends, active)]
