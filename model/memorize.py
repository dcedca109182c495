"""The memorization loop: route, train the new experts only, commit, verify through serving.

Engine-agnostic: `verify` is a callable that answers, for a list of facts, what the serving
engine generates greedily for each prompt (after `publish` has made the new store version
visible to it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from model.config import TrainConfig
from model.expert_gates import separate
from model.facts import EncodedFact, choose_locus, context_views
from model.memory_layer import MemoryLayer
from model.reference import ReferenceModel
from model.trainer import train_facts

logger = logging.getLogger(__name__)

SAME_LOCUS = 0.999  # cosine of two keys taken at the same position of the same prompt text


@dataclass
class FactOutcome:
    owner: int
    memorized: bool
    expert_ids: list[int]
    steps: int
    loss: float
    margin: float
    attempts: int
    served: str  # what the serving engine generated at the last check
    error: str | None = None
    # Memorized facts with the very same prompt: this fact replaced them (when memorized),
    # or their experts were put back (when it failed), under these new expert ids.
    replaced: list[int] = field(default_factory=list)
    restored: dict[int, list[int]] = field(default_factory=dict)


def normalize(text: str) -> str:
    return " ".join(text.split())


def answer_matches(generated: str, answer: str) -> bool:
    """Greedy output starts with the answer, whitespace normalized."""
    return normalize(generated).startswith(normalize(answer))


class PhaseClock:
    """Seconds spent per phase of one batch, for the log line that closes it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items())
        return f"{self._last - self._start:.2f} s ({parts})"


class Memorizer:
    def __init__(self, ref: ReferenceModel, memory: MemoryLayer, cfg: TrainConfig):
        self.ref = ref
        self.memory = memory
        self.cfg = cfg

    def keys_for(self, facts: list[EncodedFact]) -> torch.Tensor:
        """One key per fact: the router's query at the fact's locus."""
        keys = []
        router = self.memory.router
        for fact in facts:
            h, _ = self.ref.lower(torch.tensor([fact.prompt_ids]))
            with torch.no_grad():
                raw = (h[0] - router.mean) @ router.projection.T
            keys.append(torch.nn.functional.normalize(raw[choose_locus(fact, raw,
                                                                      self.ref.tokenizer)], dim=-1))
        return torch.stack(keys)

    def memorize(self, owners: list[int], facts: list[EncodedFact],
                 publish: Callable[[], None],
                 verify: Callable[[list[EncodedFact]], list[str]],
                 progress: Callable[[int], None] | None = None,
                 recall: Callable[[list[int]], list[EncodedFact | None]] | None = None,
                 ) -> list[FactOutcome]:
        """Memorize a batch; committed experts of facts that never verify are freed again.

        `recall` gives memorized facts back by owner: the stored facts whose gates had to
        move for this batch are then verified too, and retrained if they no longer answer.
        """
        store = self.memory.store
        clock = PhaseClock()
        unit_keys = self.keys_for(facts).numpy()
        # A fact posted again with another answer replaces the old one: both answers cannot
        # be the greedy continuation of one prompt, and training against the old expert
        # only fights it. Its experts are set aside and come back if the new fact fails.
        replaced = self._same_prompt(unit_keys, facts, owners, recall)
        set_aside = np.array([e for pairs in replaced.values() for _, e in pairs], dtype=np.int64)
        if len(set_aside):
            saved = (store.read_keys(set_aside), store.read_values(set_aside),
                     store.owner_of(set_aside))
            store.free(set_aside)
            self.memory.refresh()  # trained as served: without them
        plan = separate(store, unit_keys, self.memory.cfg)
        if len(plan.rekeyed_ids):  # neighbours first, so training sees them as served
            store.write_keys(plan.rekeyed_ids, plan.rekeyed_keys)
            self.memory.refresh()
        keys = torch.from_numpy(plan.new_keys)
        max_len = self.ref.model.config.max_position_embeddings
        views = [v for f in facts
                 for v in context_views(f, self.ref.tokenizer, self.cfg.context_views, max_len)]
        clock.lap("route")
        result = train_facts(self.ref, self.memory, facts, keys, self.cfg, views=views)
        clock.lap("train")
        ids = store.add(keys.numpy(), result.values.numpy(), np.array(owners))

        # Everything checked through serving: the new facts, then the neighbours they moved.
        checked, expert = list(facts), list(ids)
        for fact, expert_id in self._neighbours(plan.rekeyed_ids, owners, recall):
            checked.append(fact)
            expert.append(expert_id)
        expert = np.array(expert, dtype=np.int64)
        steps = [result.steps] * len(facts) + [0] * (len(checked) - len(facts))
        loss, margin = list(result.loss), list(result.margin)  # of the last round that trained
        served: list[str] = []
        attempts = 1
        while True:
            self.memory.refresh()
            publish()
            clock.lap("commit")
            # Every round checks everything: retraining one expert can move a close neighbour.
            served = verify(checked)
            clock.lap("verify")
            pending = [i for i in range(len(checked))
                       if not answer_matches(served[i], checked[i].answer_text)]
            if progress:
                progress(len(facts) - sum(i < len(facts) for i in pending))
            if not pending or attempts >= self.cfg.max_attempts:
                break
            # Retrain the whole group together (a miss is often two close experts fighting),
            # from where they are, with more steps and a wider margin.
            attempts += 1
            retry_cfg = TrainConfig(**{**self.cfg.__dict__, "margin": self.cfg.margin * attempts})
            sub = train_facts(self.ref, self.memory, checked,
                              torch.from_numpy(store.read_keys(expert)), retry_cfg,
                              init_values=torch.from_numpy(store.read_values(expert)),
                              max_steps=self.cfg.max_steps * attempts, stored_ids=expert)
            clock.lap("train")
            store.write_values(expert, sub.values.numpy())
            for i in range(len(checked)):
                steps[i] += sub.steps
                if i < len(facts):
                    loss[i], margin[i] = sub.loss[i], sub.margin[i]
        failed = [i for i in pending if i < len(facts)]
        restored: dict[int, list[int]] = {}
        if failed:
            store.free(ids[failed])
            back = np.isin(saved[2], [o for i in failed for o, _ in replaced.get(i, [])]) \
                if len(set_aside) else np.zeros(0, dtype=bool)
            if back.any():
                new_ids = store.add(saved[0][back], saved[1][back], saved[2][back])
                for owner, expert_id in zip(saved[2][back], new_ids):
                    restored.setdefault(int(owner), []).append(int(expert_id))
            self.memory.refresh()
            publish()
        broken = len(pending) - len(failed)
        clock.lap("commit")
        logger.info("memorized %d/%d facts in %s; %d neighbours checked, %d still wrong",
                    len(facts) - len(failed), len(facts), clock, len(checked) - len(facts),
                    broken)
        return [FactOutcome(owner=owners[i], memorized=i not in failed,
                            expert_ids=[int(ids[i])] if i not in failed else [],
                            steps=steps[i], loss=loss[i], margin=margin[i],
                            attempts=attempts, served=served[i],
                            error=(f"after {attempts} attempts the served answer was "
                                   f"{served[i]!r}") if i in failed else None,
                            replaced=[o for o, _ in replaced.get(i, [])] if i not in failed
                            else [],
                            restored={o: restored[o] for o, _ in replaced.get(i, [])
                                      if o in restored})
                for i in range(len(facts))]

    def _same_prompt(self, unit_keys: np.ndarray, facts: list[EncodedFact], owners: list[int],
                     recall) -> dict[int, list[tuple[int, int]]]:
        """Per new fact (by index): (owner, expert id) of memorized facts with its prompt.

        Same prompt text means the same key, so the candidates are the stored keys at
        cosine ~1; recall then compares the prompts' tokens.
        """
        store = self.memory.store
        if recall is None or not len(store):
            return {}
        _, ids = store.search(unit_keys, min(4, len(store)))
        candidates: dict[int, list[int]] = {}
        for i, found in enumerate(ids):
            found = found[found >= 0]
            if not len(found):
                continue
            stored = store.read_keys(found)
            cos = (stored / np.linalg.norm(stored, axis=1, keepdims=True)) @ unit_keys[i]
            candidates[i] = [int(e) for e in found[cos >= SAME_LOCUS]]
        experts = sorted({e for found in candidates.values() for e in found})
        if not experts:
            return {}
        expert_owner = dict(zip(experts, map(int, store.owner_of(np.array(experts)))))
        stored_owners = sorted({o for o in expert_owner.values() if o not in owners})
        prompts = {o: f.prompt_ids for o, f in zip(stored_owners, recall(stored_owners)) if f}
        out: dict[int, list[tuple[int, int]]] = {}
        for i, found in candidates.items():
            same = [(expert_owner[e], e) for e in found
                    if prompts.get(expert_owner[e]) == facts[i].prompt_ids]
            if same:
                out[i] = same
        return out

    def _neighbours(self, rekeyed: np.ndarray, owners: list[int], recall):
        """(fact, expert id) of the stored facts whose gates this batch moved."""
        if recall is None or not len(rekeyed):
            return []
        by_owner = {int(o): int(e) for e, o in zip(rekeyed, self.memory.store.owner_of(rekeyed))
                    if int(o) not in owners}
        found = recall(list(by_owner))
        return [(f, by_owner[o]) for o, f in zip(by_owner, found) if f is not None]
