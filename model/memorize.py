"""The memorization of one batch of facts, step by step.

    reword      chat facts' other wordings of their question (model/rewordings.py), trained
                with them and joined into their second keys
    set aside   memorized facts with the same prompt (a fact posted again replaces them)
    plan gates  keys for the new facts; close stored neighbours' gates rise
    train       the new experts' values only, backbone and router frozen
    commit      the new experts into the store
    verify      through the serving engines (after they serve the new version), with the
                stored neighbours whose gates moved and the stored facts whose prompts a new
                expert fires on; a round retrains only the checked facts that missed and those
                whose experts fire in their rows (the others guard their answers), up to
                `max_attempts` rounds
    settle      facts that never verify are freed (their replaced facts come back); a stored
                neighbour left wrong gets its rows back and the new facts whose experts fire
                in it are dropped; a batch that raises, or cannot settle so, is rolled back whole

Engine-agnostic: the serving side is reached through `Serving` (the in-process engine or a
server's HTTP API, see server/serving_link.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from expert_store.store import FREE
from model.batch_journal import BatchJournal, Rows
from model.config import TrainConfig
from model.expert_gates import OWN_LOCUS_MARGIN, lean_toward, separate
from model.facts import (
    CONTEXT_PREFIXES,
    EncodedFact,
    choose_locus,
    content_positions,
    context_views,
    history_views,
    last_question,
    reworded_view,
)
from model.memory_layer import MemoryLayer
from model.reference import ReferenceModel, right_padded
from model.relation_key import relation_mean, scaled_key
from model.relation_map import question_means
from model.rewordings import Rewordings, joined_key
from model.stored_prompts import StoredPrompts, TurnQueries
from model.trainer import fires_in, train_facts

logger = logging.getLogger(__name__)

# Cosine of two keys taken at the same position of the same prompt text, either asked as
# posted or leaned toward other contexts (fact_keys) by up to SAME_LOCUS_LEAN below that:
# a store keyed under another lean setting must still be found (tokens are compared after).
SAME_LOCUS = 0.999
SAME_LOCUS_LEAN = 0.001

# Memorized facts by owner, encoded as they were trained (None for a fact that is gone).
Recall = Callable[[list[int]], list[EncodedFact | None]]


class Serving(Protocol):
    """What memorization needs from the serving side."""

    def publish(self, version: int) -> None:
        """Return once every serving engine serves store `version` or later (or raise)."""

    def answers(self, facts: list[EncodedFact]) -> list[str]:
        """The serving engines' greedy answers to these facts' prompts."""


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


@dataclass
class _Batch:
    """One batch on its way through the steps; what is recorded here is what rollback undoes."""

    owners: list[int]
    facts: list[EncodedFact]
    loci: list[int] = field(default_factory=list)  # the prompt position each key was taken at
    relations: np.ndarray | None = None  # the facts' second keys (model/relation_key.py)
    relation_maps: np.ndarray | None = None  # the router's map each compares through
    reworded: list[EncodedFact] = field(default_factory=list)  # other wordings, trained too
    # New fact index -> [(owner, expert id)] of memorized facts with its prompt.
    replaced: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    set_aside: Rows | None = None  # their experts, freed while the batch trains
    neighbours: Rows | None = None  # stored experts whose gates this batch moves, as they were
    changed: Rows | None = None  # every stored row the batch wrote, as it was (also on disk)
    ids: np.ndarray | None = None  # the new experts, once committed
    checked: list[EncodedFact] = field(default_factory=list)  # verified each round
    checked_ids: np.ndarray | None = None  # their experts
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    served: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # indexes into `checked` still wrong
    errors: dict[int, str] = field(default_factory=dict)  # why a new fact failed, if not a miss
    attempts: int = 0


KEY_BATCH = 32  # prompts run through the lower layers together to find their keys


class Memorizer:
    def __init__(self, ref: ReferenceModel, memory: MemoryLayer, cfg: TrainConfig):
        self.ref = ref
        self.memory = memory
        self.store = memory.store
        self.cfg = cfg
        self.journal = BatchJournal(self.store.path)
        self.prompts = StoredPrompts(ref.tokenizer)
        self.turn_queries = TurnQueries(self._turn_queries)
        self._rewordings: Rewordings | None = None  # built when a chat fact is first reworded

    def keys_for(self, facts: list[EncodedFact], loci: list[int] | None = None) -> torch.Tensor:
        """One unit key per fact: the router's query at the fact's locus (or at `loci`)."""
        return self.keys_and_loci(facts, loci)[0]

    def keys_and_loci(self, facts: list[EncodedFact], loci: list[int] | None = None
                      ) -> tuple[torch.Tensor, list[int]]:
        """`keys_for`, and the prompt position each key was taken at."""
        if loci is not None:
            return self._keys_at(facts, loci), list(loci)
        keys, chosen, _ = self._keys(facts, with_relations=False)
        return keys, chosen

    def _keys(self, facts: list[EncodedFact], with_relations: bool
              ) -> tuple[torch.Tensor, list[int], np.ndarray | None]:
        """Unit keys at the loci chosen for the facts, those loci and (`with_relations`) the
        facts' second keys, stored as model/relation_key.py serves them (zero rows where the
        configuration has none)."""
        keys, chosen, relations = [], [], []
        router, tok = self.memory.router, self.ref.tokenizer
        for _, chunk, h in self._lower_in_chunks(facts):
            with torch.no_grad():
                raw = router.whiten(h)
            for fact, fact_raw in zip(chunk, raw):
                locus = choose_locus(fact, fact_raw[:len(fact.prompt_ids)], tok)
                chosen.append(locus)
                keys.append(torch.nn.functional.normalize(fact_raw[locus], dim=-1))
                if with_relations:
                    relations.append(self._relation_key(fact, fact_raw, locus))
        return (torch.stack(keys), chosen,
                torch.stack(relations).numpy() if with_relations else None)

    def _keys_at(self, facts: list[EncodedFact], loci: list[int]) -> torch.Tensor:
        """Unit keys at known loci. Under causal attention nothing after a locus reaches it,
        so each prompt runs only up to its locus, and prompts of like length run together
        (less padding): a third less time for the prefixed views a completion key leans on."""
        assert all(0 <= at < len(f.prompt_ids) for f, at in zip(facts, loci)), "locus outside a prompt"
        order = sorted(range(len(facts)), key=lambda i: loci[i])
        keys = torch.empty(len(facts), self.memory.router.d_k, dtype=torch.float32)
        for start in range(0, len(order), KEY_BATCH):
            rows = order[start:start + KEY_BATCH]
            at = [loci[i] for i in rows]
            ids = right_padded([facts[i].prompt_ids[:a + 1] for i, a in zip(rows, at)])
            h, _ = self.ref.lower(ids)
            h = self.ref.routed(ids, h)
            keys[rows] = self.memory.router(h[torch.arange(len(rows)), at])
        return keys

    def _relation_gate(self, fact: EncodedFact) -> float:
        router = self.memory.router
        return self.memory.cfg.relation_gate(fact.kind, router.map_name(router.map_for(fact.kind)))

    def _relation_key(self, fact: EncodedFact, raw: torch.Tensor, locus: int) -> torch.Tensor:
        threshold = self._relation_gate(fact)
        mean = relation_mean(fact.prompt_ids, raw, locus, self.ref.tokenizer,
                             self.memory.turn_marker) if threshold else None
        if mean is None:
            return torch.zeros(raw.shape[-1])
        router = self.memory.router
        return scaled_key(router.relation_view(mean[None], [router.map_for(fact.kind)])[0], threshold)

    def fact_keys(self, facts: list[EncodedFact], alone: torch.Tensor | None = None,
                  loci: list[int] | None = None) -> torch.Tensor:
        """The keys the facts are stored under: `keys_for` (or `alone`, taken at `loci`),
        leaned toward the locus asked in other contexts, so the expert still fires there: a
        completion fact's behind the context prefixes (TrainConfig.key_behind_prefixes,
        ROME's keys averaged over prefixes). A chat fact's question asked later in a
        conversation needs no lean: the router reads that turn as if asked alone
        (ReferenceModel.routed)."""
        if alone is None or loci is None:
            alone, loci = self.keys_and_loci(facts)
        keys = alone.clone()
        max_len = self.ref.model.config.max_position_embeddings
        tok = self.ref.tokenizer
        behind = []  # (fact, views, the locus in each view)
        for i, fact in enumerate(facts):
            if fact.kind != "completion" or not self.cfg.key_behind_prefixes:
                continue
            views = context_views(fact, tok, len(CONTEXT_PREFIXES), max_len)
            tail = fact.prompt_ids[loci[i]:]
            # The prompt ends each view token for token: the same locus, counted from the
            # end (a locus chosen again in the view could be another token). A locus on the
            # prompt's first word tokenizes otherwise behind a prefix: no view, no lean.
            views = [v for v in views if v.prompt_ids[-len(tail):] == tail]
            if views:
                behind.append((i, views, [len(v.prompt_ids) - len(tail) for v in views]))
        if behind:
            rows = torch.tensor([i for i, _, _ in behind])
            later = self.keys_for([v for _, vs, _ in behind for v in vs],
                                  [at for _, _, ats in behind for at in ats])
            # Per fact, its views' unit mean (one view's key is a unit already: not
            # normalized again).
            toward = torch.stack([
                own[0] if len(own) == 1 else torch.nn.functional.normalize(own.mean(0), dim=-1)
                for own in later.split([len(vs) for _, vs, _ in behind])])
            keys[rows] = lean_toward(alone[rows], toward,
                                     self.memory.cfg.max_threshold + OWN_LOCUS_MARGIN)
        return keys

    def memorize(self, owners: list[int], facts: list[EncodedFact], serving: Serving,
                 recall: Recall | None = None) -> list[FactOutcome]:
        """Memorize a batch: every fact ends memorized (verified through serving) or failed
        with nothing of it left in the store. Never raises once the store has changed.

        `recall` gives memorized facts back by owner: the stored facts whose gates move for
        this batch are then verified too, and retrained if they no longer answer.
        """
        batch = _Batch(owners=list(owners), facts=list(facts))
        if self.journal.path.exists():  # left by a caller that does not record outcomes
            logger.warning("the previous batch's journal was never settled: dropped")
            self.journal.clear()
        clock = PhaseClock()
        try:
            alone, batch.loci, batch.relations = self._keys(facts, with_relations=True)
            batch.relation_maps = np.array([self.memory.router.map_for(f.kind) for f in facts],
                                           dtype=np.uint8)
            self._reword(batch)
            unit_keys = self.fact_keys(facts, alone, batch.loci).numpy()
            # A fact memorized before its kind's keys leaned (behind history, behind
            # prefixes) has its prompt-alone key: the same prompt is looked for under both.
            self._set_aside_same_prompt(batch, [unit_keys, alone.numpy()], recall)
            keys = self._plan_gates(batch, unit_keys)
            clock.lap("route")
            self._train_and_commit(batch, keys)
            clock.lap("train")
            self._check_neighbours_too(batch, recall)
            self._verify_and_retrain(batch, serving, clock)
            broken = [i for i in batch.pending if i >= len(facts)]
            if broken:
                self._drop_culprits(batch, broken, serving)
                clock.lap("verify")
        except Exception as exc:
            logger.exception("memorization batch rolled back")
            restored = self._roll_back(batch, serving)
            return self._outcomes(batch, failed=list(range(len(facts))), restored=restored,
                                  error=f"memorization failed and was rolled back: {exc}")
        failed = [i for i in batch.pending if i < len(facts)]
        restored = self._free_failed(batch, failed, serving)
        clock.lap("commit")
        logger.info("memorized %d/%d facts in %s; %d neighbours checked; %d rounds",
                    len(facts) - len(failed), len(facts), clock,
                    len(batch.checked) - len(facts), batch.attempts)
        return self._outcomes(batch, failed, restored)

    # ---- the steps --------------------------------------------------------------------------

    def _set_aside_same_prompt(self, batch: _Batch, key_sets: list[np.ndarray],
                               recall: Recall | None) -> None:
        """A fact posted again with another answer replaces the old one: both answers cannot
        be the greedy continuation of one prompt, and training against the old expert only
        fights it. Its experts are freed here and come back if the new fact fails."""
        batch.replaced = self._same_prompt(key_sets, batch.facts, batch.owners, recall)
        ids = np.array([e for pairs in batch.replaced.values() for _, e in pairs],
                       dtype=np.int64)
        if len(ids):
            batch.set_aside = self._rows(ids)
            self.store.free(ids)
            self.memory.refresh()  # trained as served: without them

    def _plan_gates(self, batch: _Batch, unit_keys: np.ndarray) -> torch.Tensor:
        """The new facts' keys; stored neighbours' gates rise first, so training sees them
        as they will be served."""
        plan = separate(self.store, unit_keys, self.memory.cfg)
        if len(plan.rekeyed_ids):
            batch.neighbours = self._rows(plan.rekeyed_ids)
            self._keep(batch, batch.neighbours)
            self.store.write_keys(plan.rekeyed_ids, plan.rekeyed_keys)
            self.memory.refresh()
        return torch.from_numpy(plan.new_keys)

    def _views(self, batch: _Batch) -> list[EncodedFact]:
        """The facts also asked behind other text and in other words, trained with them
        (model/facts.py, model/rewordings.py)."""
        max_len = self.ref.model.config.max_position_embeddings
        tok = self.ref.tokenizer
        return [v for f in batch.facts
                for v in (context_views(f, tok, self.cfg.context_views, max_len)
                          + history_views(f, tok, self.cfg.history_views, max_len))
                ] + batch.reworded

    def _reword(self, batch: _Batch) -> None:
        """Chat facts asked in up to `reworded_views` other wordings of their relation
        (model/rewordings.py). Each wording is a view with the same answer, trained wherever
        the batch's experts fire in it. The fact's second key becomes the unit centroid of
        its own relation mean and the wordings' (offline, held out, that passed 2 points
        more rephrasings and 1 point fewer near misses than the own mean; end to end it
        changed no outcome on 100 facts, reports/METHODS.md).

        Not reworded: facts whose relation the bank does not know, facts without a second
        key (a relation gate of 0), and stores whose router has no relation map (the bank's
        match threshold was measured through the map only)."""
        n = self.cfg.reworded_views
        if n <= 0 or self.memory.router.relation is None:
            return
        chat = [i for i, f in enumerate(batch.facts)
                if f.kind == "chat" and batch.relations[i].any()]
        if not chat:
            return
        bank = self.rewordings()
        asked = {i: bank.of(last_question(batch.facts[i].payload),
                            batch.facts[i].payload.get("subject"),
                            torch.from_numpy(batch.relations[i]), n) for i in chat}
        questions = [q for qs in asked.values() for q in qs]
        if not questions:
            return
        means = self._relation_means(questions)
        max_len = self.ref.model.config.max_position_embeddings
        at = 0
        for i, qs in asked.items():
            fact = batch.facts[i]
            batch.relations[i] = joined_key(torch.from_numpy(batch.relations[i]),
                                            means[at:at + len(qs)],
                                            self._relation_gate(fact)).numpy()
            at += len(qs)
            for question in qs:
                view = reworded_view(fact, question, self.ref.tokenizer, max_len)
                if view is not None:
                    batch.reworded.append(view)

    def _relation_means(self, questions: list[str]) -> torch.Tensor:
        """Chat questions' relation means as second keys compare them (unit; zero rows for
        questions without relation words)."""
        router = self.memory.router
        return router.relation_view(question_means(self.ref, router, questions))

    def rewordings(self) -> Rewordings:
        """The bundled template bank, its means taken through this store's router."""
        if self._rewordings is None:
            self._rewordings = Rewordings.cached(self.memory.router.fingerprint(),
                                                 self._relation_means)
        return self._rewordings

    def _train_and_commit(self, batch: _Batch, keys: torch.Tensor) -> None:
        result = train_facts(self.ref, self.memory, batch.facts, keys, self.cfg,
                             views=self._views(batch))
        batch.ids = self.store.add(keys.numpy(), result.values.numpy(), np.array(batch.owners),
                                   batch.relations, batch.relation_maps)
        batch.steps = list(result.expert_steps)
        batch.loss, batch.margin = list(result.loss), list(result.margin)

    def _check_neighbours_too(self, batch: _Batch, recall: Recall | None) -> None:
        """Every round verifies the new facts, the stored facts whose gates moved, and the
        stored facts whose prompts a new expert fires on."""
        batch.checked, expert = list(batch.facts), list(batch.ids)
        moved = batch.neighbours.ids if batch.neighbours is not None else np.zeros(0, np.int64)
        for fact, expert_id in (self._neighbours(moved, batch.owners, recall)
                                + self._fired_on_stored(batch, recall)):
            if expert_id not in expert:
                batch.checked.append(fact)
                expert.append(expert_id)
        batch.checked_ids = np.array(expert, dtype=np.int64)
        batch.steps += [0] * (len(batch.checked) - len(batch.facts))

    def _verify_and_retrain(self, batch: _Batch, serving: Serving, clock: PhaseClock) -> None:
        """Verify through serving; retrain what misses, up to `max_attempts` rounds."""
        while True:
            batch.attempts += 1
            self.publish(serving)
            clock.lap("commit")
            batch.served = serving.answers(batch.checked)
            clock.lap("verify")
            batch.pending = [i for i, fact in enumerate(batch.checked)
                             if not answer_matches(batch.served[i], fact.answer_text)]
            if not batch.pending or batch.attempts >= self.cfg.max_attempts:
                return
            self._retrain_missed(batch)
            clock.lap("train")

    def _retrain_missed(self, batch: _Batch) -> None:
        """Retrain the checked facts that missed, with the checked facts whose experts fire in
        their rows (a miss is often two close experts fighting), from where they are, with
        more steps and a wider margin. Every other checked fact an expert of theirs fires in
        trains beside them as a guard (its answer must still lead by the views' margin), as do
        the new facts' views (a chat fact must still answer behind an exchange). The rest
        keep their values: at 10,000 facts a batch checks ~40 facts for one or two misses."""
        n = len(batch.facts)
        ids = batch.checked_ids
        keys = torch.from_numpy(self.store.read_keys(ids))
        chosen = _with_colliders(batch.pending, fires_in(self.ref, self.memory, batch.checked,
                                                         keys))
        guards = [f for i, f in enumerate(batch.checked) if i not in chosen]
        retry = TrainConfig(**{**self.cfg.__dict__,
                               "margin": self.cfg.margin * (batch.attempts + 1)})
        result = train_facts(self.ref, self.memory, [batch.checked[i] for i in chosen],
                             keys[chosen], retry,
                             init_values=torch.from_numpy(self.store.read_values(ids[chosen])),
                             max_steps=self.cfg.max_steps * (batch.attempts + 1),
                             stored_ids=ids[chosen], views=guards + self._views(batch))
        stored = [i for i in chosen if i >= n]
        if stored:
            self._keep(batch, self._rows(ids[stored]))
        self.store.write_values(ids[chosen], result.values.numpy())
        for k, i in enumerate(chosen):
            batch.steps[i] += result.expert_steps[k]
            if i < n:
                batch.loss[i], batch.margin[i] = result.loss[k], result.margin[k]
        logger.info("retry %d: retrained %d of %d checked facts (%d missed) in %d steps",
                    batch.attempts, len(chosen), len(batch.checked), len(batch.pending),
                    result.steps)

    def _drop_culprits(self, batch: _Batch, broken: list[int], serving: Serving) -> None:
        """Stored neighbours (`broken`, indexes into `checked`) no longer answer after the
        last round. The new facts whose experts fire in their rows are dropped and the
        neighbours get their rows back as they were before the batch; the rest of the batch
        is verified again and stays. Raises (the caller rolls back whole) when no new expert
        fires in a broken row, or a stored fact is still wrong after."""
        n = len(batch.facts)
        fires = fires_in(self.ref, self.memory, [batch.checked[i] for i in broken],
                         torch.from_numpy(self.store.read_keys(batch.ids)))
        culprits = sorted(set(fires.nonzero()[:, 1].tolist()))
        if not culprits:
            raise RuntimeError(f"{len(broken)} memorized neighbours no longer answer after "
                               "this batch")
        if batch.changed is not None:  # their gates and values as before the batch
            owners = self.store.owner_of(batch.checked_ids[broken])
            self._restore(batch.changed.only(np.isin(batch.changed.owners, owners)))
        self.store.free(batch.ids[culprits])
        self.publish(serving)
        kept = [i for i in range(len(batch.checked)) if i not in culprits]
        served = serving.answers([batch.checked[i] for i in kept])
        wrong = [i for i, text in zip(kept, served)
                 if not answer_matches(text, batch.checked[i].answer_text)]
        for i, text in zip(kept, served):
            batch.served[i] = text
        if any(i >= n for i in wrong):
            raise RuntimeError(f"{sum(i >= n for i in wrong)} memorized neighbours no longer "
                               "answer after this batch")
        logger.warning("dropped %d new facts whose experts broke %d memorized neighbours",
                       len(culprits), len(broken))
        for i in culprits:
            batch.errors[i] = ("dropped: its expert fires in a memorized fact's prompt that "
                               "then no longer answered")
        batch.pending = sorted(set(culprits) | set(wrong))

    def _free_failed(self, batch: _Batch, failed: list[int], serving: Serving
                     ) -> dict[int, list[int]]:
        """Facts that never verified leave no expert behind; the facts they were to replace
        come back. Returns {old owner: its new expert ids}."""
        if not failed:
            return {}
        self.store.free(batch.ids[failed])
        back = [o for i in failed for o, _ in batch.replaced.get(i, [])]
        restored = self._put_back(batch.set_aside, back)
        self.publish(serving)
        return restored

    def _roll_back(self, batch: _Batch, serving: Serving) -> dict[int, list[int]]:
        """Undo whatever the batch changed in the store, then serve the result."""
        try:
            if batch.ids is not None:
                self.store.free(batch.ids)
            if batch.changed is not None:
                self._restore(batch.changed)
            back = [o for pairs in batch.replaced.values() for o, _ in pairs]
            restored = self._put_back(batch.set_aside, back)
        except Exception:
            logger.exception("rolling back a failed batch failed; the store keeps its state")
            return {}
        try:
            self.publish(serving)
        except Exception:  # the engines load the rolled-back store at their next refresh
            logger.exception("could not publish the rolled-back store")
        return restored

    def _outcomes(self, batch: _Batch, failed: list[int], restored: dict[int, list[int]],
                  error: str | None = None) -> list[FactOutcome]:
        out = []
        for i, owner in enumerate(batch.owners):
            ok = i not in failed
            served = batch.served[i] if i < len(batch.served) else ""
            old = [o for o, _ in batch.replaced.get(i, [])]
            out.append(FactOutcome(
                owner=owner, memorized=ok,
                expert_ids=[int(batch.ids[i])] if ok else [],
                steps=batch.steps[i] if i < len(batch.steps) else 0,
                loss=batch.loss[i] if i < len(batch.loss) else float("nan"),
                margin=batch.margin[i] if i < len(batch.margin) else float("nan"),
                attempts=batch.attempts, served=served,
                error=None if ok else (error or batch.errors.get(i)
                                       or f"after {batch.attempts} attempts the served "
                                          f"answer was {served!r}"),
                replaced=old if ok else [],
                restored={o: restored[o] for o in old if o in restored}))
        return out

    # ---- helpers ----------------------------------------------------------------------------

    def publish(self, serving: Serving) -> None:
        """Make the serving engines serve the store as it is now; rows freed before can then
        be reused (no engine searches an index that still holds them)."""
        self.memory.refresh()
        version = self.store.version
        serving.publish(version)
        self.store.release_freed(version)

    def _keep(self, batch: _Batch, rows: Rows) -> None:
        """Note stored rows as they are before the batch first writes them, in memory for a
        rollback and on disk for a crash."""
        rows = rows.only(rows.owners != FREE)  # deleted meanwhile: nothing to put back
        if not len(rows):
            return
        kept = rows if batch.changed is None else batch.changed.plus(rows)
        if batch.changed is None or len(kept) > len(batch.changed):
            batch.changed = kept
            self.journal.write(batch.owners, kept)

    def batch_recorded(self) -> None:
        """The last batch's outcomes are in the registry: its stored rows stay as they are."""
        self.journal.clear()

    def undo_interrupted_batch(self, recorded: set[int]) -> int:
        """After a crash: put back the stored rows a batch changed if none of its facts got an
        outcome (none is in `recorded`, the memorized and failed facts); its own experts are
        orphans the caller frees. Returns how many rows were put back."""
        try:
            found = self.journal.read()
        except Exception:  # unreadable: recovery must not fail on it at every start
            logger.exception("the batch journal cannot be read: dropped")
            self.journal.clear()
            return 0
        if found is None:
            return 0
        batch_owners, rows = found
        restored = 0
        if not set(batch_owners) & recorded:
            restored = self._restore(rows)
        else:
            logger.warning("a batch was recorded in part before a crash: its %d changed "
                           "neighbours stay as verified with it", len(rows))
        self.journal.clear()
        return restored

    def _restore(self, rows: Rows) -> int:
        """Write rows back as they were, those still of the fact they belonged to (not
        deleted meanwhile); returns how many."""
        alive = (self.store.owner_of(rows.ids) == rows.owners) & (rows.owners != FREE)
        if alive.any():
            self.store.write_keys(rows.ids[alive], rows.keys[alive])
            self.store.write_values(rows.ids[alive], rows.values[alive])
        return int(alive.sum())

    def _rows(self, ids: np.ndarray) -> Rows:
        return Rows(ids, self.store.read_keys(ids), self.store.read_values(ids),
                    self.store.owner_of(ids), self.store.read_relations(ids),
                    self.store.read_relation_maps(ids))

    def _put_back(self, rows: Rows | None, owners: list[int]) -> dict[int, list[int]]:
        """Add set-aside rows of these owners back (under new ids)."""
        if rows is None or not owners:
            return {}
        back = np.isin(rows.owners, owners)
        if not back.any():
            return {}
        new_ids = self.store.add(rows.keys[back], rows.values[back], rows.owners[back],
                                 *(None if a is None else a[back]
                                   for a in (rows.relations, rows.relation_maps)))
        restored: dict[int, list[int]] = {}
        for owner, expert_id in zip(rows.owners[back], new_ids):
            restored.setdefault(int(owner), []).append(int(expert_id))
        return restored

    def _same_prompt(self, key_sets: list[np.ndarray], facts: list[EncodedFact],
                     owners: list[int], recall: Recall | None
                     ) -> dict[int, list[tuple[int, int]]]:
        """Per new fact (by index): (owner, expert id) of memorized facts with its prompt.

        Same prompt text means the same key (one of `key_sets`, each (n, d_k)), so the
        candidates are the stored keys at cosine ~1; recall then compares the prompts' tokens.
        """
        store = self.store
        if recall is None or not len(store):
            return {}
        leaned = self.memory.cfg.max_threshold + OWN_LOCUS_MARGIN  # lean_toward's floor
        same = min(SAME_LOCUS, leaned - SAME_LOCUS_LEAN)
        candidates: dict[int, list[int]] = {}
        for unit_keys in key_sets:
            _, ids = store.search(unit_keys, min(4, len(store)))
            for i, found in enumerate(ids):
                found = found[found >= 0]
                if not len(found):
                    continue
                stored = store.read_keys(found)
                cos = (stored / np.linalg.norm(stored, axis=1, keepdims=True)) @ unit_keys[i]
                near = [int(e) for e in found[cos >= same]]
                candidates[i] = sorted(set(candidates.get(i, [])) | set(near))
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

    def _fired_on_stored(self, batch: _Batch, recall: Recall | None
                         ) -> list[tuple[EncodedFact, int]]:
        """(fact, expert id) of the stored facts whose prompts hold a new fact's key token
        and in whose turn a new expert passes the gate (model/stored_prompts.py)."""
        if recall is None:
            return []
        ids = self.store.allocated_ids()
        owners = self.store.owner_of(ids)
        stored = ~np.isin(owners, batch.owners)
        # Each stored owner once, with its first expert (the one a retrain is booked under).
        stored_owners, first = np.unique(owners[stored], return_index=True)
        expert_of = dict(zip(stored_owners.tolist(), ids[stored][first].tolist()))
        tokens = {fact.prompt_ids[locus] for fact, locus in zip(batch.facts, batch.loci)}
        holders = self.prompts.holding(tokens, list(expert_of), recall)
        keys = torch.from_numpy(self.store.read_keys(batch.ids))
        hit = [owner for owner, queries in self.turn_queries.of(holders, recall).items()
               if bool(((queries @ keys.T) >= self.memory.cfg.gate).any())]
        return [(fact, expert_of[owner])
                for owner, fact in zip(hit, recall(hit)) if fact is not None]

    def _turn_queries(self, facts: list[EncodedFact]) -> list[torch.Tensor]:
        """The router's queries (n, d_k) at each fact's turn tokens (where experts may fire)."""
        out = []
        for _, chunk, h in self._lower_in_chunks(facts):
            with torch.no_grad():
                queries = self.memory.router(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:2], -1)
            out += [queries[j, content_positions(fact, self.ref.tokenizer)]
                    for j, fact in enumerate(chunk)]
        return out

    def _lower_in_chunks(self, facts: list[EncodedFact]):
        """(start, chunk, the states the router reads at the memory layer: a turn after
        earlier ones as if asked alone), KEY_BATCH prompts at a time."""
        for start in range(0, len(facts), KEY_BATCH):
            chunk = facts[start:start + KEY_BATCH]
            ids = right_padded([f.prompt_ids for f in chunk])
            h, _ = self.ref.lower(ids)
            yield start, chunk, self.ref.routed(ids, h)

    def _neighbours(self, moved: np.ndarray, owners: list[int], recall: Recall | None):
        """(fact, expert id) of the stored facts whose gates this batch moved."""
        if recall is None or not len(moved):
            return []
        by_owner = {int(o): int(e) for e, o in zip(moved, self.store.owner_of(moved))
                    if int(o) not in owners}
        found = recall(list(by_owner))
        return [(f, by_owner[o]) for o, f in zip(by_owner, found) if f is not None]


def _with_colliders(pending: list[int], fires: torch.Tensor) -> list[int]:
    """`pending` and, transitively, the facts whose experts fire in their rows
    (`fires[row, expert]`, rows and experts indexed alike)."""
    chosen, frontier = set(pending), list(pending)
    while frontier:
        for j in fires[frontier.pop()].nonzero().flatten().tolist():
            if j not in chosen:
                chosen.add(j)
                frontier.append(j)
    return sorted(chosen)
