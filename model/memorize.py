"""The memorization loop: route, train the new experts only, commit, verify through serving.

Engine-agnostic: `verify` is a callable that answers, for a list of facts, what the serving
engine generates greedily for each prompt (after `publish` has made the new store version
visible to it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.config import TrainConfig
from model.facts import EncodedFact, choose_locus
from model.memory_layer import MemoryLayer
from model.reference import ReferenceModel
from model.trainer import train_facts

logger = logging.getLogger(__name__)


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


def normalize(text: str) -> str:
    return " ".join(text.split())


def answer_matches(generated: str, answer: str) -> bool:
    """Greedy output starts with the answer, whitespace normalized."""
    return normalize(generated).startswith(normalize(answer))


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
                 progress: Callable[[int], None] | None = None) -> list[FactOutcome]:
        """Memorize a batch; committed experts of facts that never verify are freed again."""
        store = self.memory.store
        keys = self.keys_for(facts)
        started = time.perf_counter()
        result = train_facts(self.ref, self.memory, facts, keys, list(range(len(facts))), self.cfg)
        ids = store.add(keys.numpy(), result.values.numpy(), np.array(owners))
        steps = [result.steps] * len(facts)
        values = result.values
        pending = list(range(len(facts)))
        served: dict[int, str] = {}
        attempts = 1
        while True:
            self.memory.refresh()
            publish()
            outputs = verify([facts[i] for i in pending])
            for i, text in zip(pending, outputs):
                served[i] = text
            pending = [i for i in pending if not answer_matches(served[i], facts[i].answer_text)]
            if progress:
                progress(len(facts) - len(pending))
            if not pending or attempts >= self.cfg.max_attempts:
                break
            # Retry the misses: more steps from where they are, with a wider margin.
            attempts += 1
            retry_cfg = TrainConfig(**{**self.cfg.__dict__, "margin": self.cfg.margin * attempts})
            sub = train_facts(self.ref, self.memory, [facts[i] for i in pending], keys[pending],
                              list(range(len(pending))), retry_cfg,
                              init_values=values[pending], max_steps=self.cfg.max_steps * attempts)
            values[pending] = sub.values
            store.write_values(ids[pending], sub.values.numpy())
            for i in pending:
                steps[i] += sub.steps
        if pending:
            store.free(ids[pending])
            self.memory.refresh()
            publish()
        logger.info("memorized %d/%d facts in %.1f s", len(facts) - len(pending), len(facts),
                    time.perf_counter() - started)
        return [FactOutcome(owner=owners[i], memorized=i not in pending,
                            expert_ids=[int(ids[i])] if i not in pending else [],
                            steps=steps[i], loss=result.loss[i], margin=result.margin[i],
                            attempts=attempts, served=served.get(i, ""),
                            error=(f"after {attempts} attempts the served answer was "
                                   f"{served.get(i, '')!r}") if i in pending else None)
                for i in range(len(facts))]
