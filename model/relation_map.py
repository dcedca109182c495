"""A learned map of relation means, so that a question's rewordings match its second key
and other questions about the same subject do not.

A fact's second key (model/relation_key.py) compares the mean router query over a question's
words outside its subject. Raw, those means put "Which city did X live in when he died?"
about as far from "What city did X live when he died?" as "What was X's occupation?" is.
A linear map W (d_k x d_k), applied to both sides before the cosine, is trained so that a
question and its rephrasing land close and the same subject asked by other relations' templates
lands far (InfoNCE with hard negatives, in the spirit of PENME, arXiv 2408.10411).

Training data: `data/relation_rows.jsonl`, zsRE dev rows 100-399 (subject, question,
rephrasing). Never the rows the held-out evaluation (400-599), the thresholds' tuning run
(0-59) or the tests (60-100) use. Two templates (a question with its subject cut out) are
one relation when a row asks its question in both; a negative is the most used template of
another relation, filled with the row's subject. Offline, held out, this moved rephrasings
answered from 0.755 to 0.79-0.85 and other-relation near misses kept from 0.865 to
0.915-0.975 over seeds and sizes (reports/METHODS.md, reports/relation-bank-offline).

Completion facts compare through a second map, fitted the same way on completion prompts:
`data/completion_relation_rows.jsonl`, CounterFact rows 1000-1999 (never the 1,000-fact runs'
rows 0-999), the rephrasing cut to its sentence that names the subject. Offline, held out
(CounterFact cases 500-999), it kept 0.890 of other-relation near misses unchanged against
the chat map's 0.587, for rephrasings 0.174 against 0.165 (reports/relation-map-offline).

The maps are fitted with the router and kept in it, frozen for a store's lifetime: a router
made before them has none, and its stores compare raw means as before (or, made before the
completion map, compare completions through the chat map).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.facts import choose_locus, encode_fact
from model.reference import ReferenceModel, right_padded
from model.relation_key import relation_mean
from model.router import Router
from model.turn_scope import user_turn_marker

ROWS = Path(__file__).with_name("data") / "relation_rows.jsonl"
COMPLETION_ROWS = ROWS.with_name("completion_relation_rows.jsonl")
NEGATIVES = 4  # other relations per row
EPOCHS = 5  # longer training kept fewer near misses offline (20, 60 epochs)
BATCH = 64
LR = 1e-2
TEMPERATURE = 0.1


def question_template(question: str, subject: str) -> str | None:
    """The question with its subject cut out ("Who is {}'s mother?"); None without it."""
    if not subject or subject not in question:
        return None
    return " ".join(question.replace(subject, "{}", 1).split())


@dataclass
class RelationTemplates:
    """Question templates ("Who is {}'s mother?") grouped into relations: two templates are
    one relation when a row asks its question in both (union-find)."""

    relation_of: dict[str, str]  # template -> its relation (a root template)
    uses: dict[str, int]  # template -> rows it was seen in
    example: dict[str, str]  # template -> a subject it was seen with
    usable: list[tuple[dict, str]]  # (row, its question's template), rows with both templates

    def by_use(self) -> dict[str, list[str]]:
        """Relation -> its templates, the most used first."""
        members: dict[str, list[str]] = {}
        for t in sorted(self.relation_of, key=lambda t: (-self.uses[t], t)):
            members.setdefault(self.relation_of[t], []).append(t)
        return members


def relation_templates(rows: list[dict]) -> RelationTemplates:
    """The rows' question templates and their relations (rows whose subject is missing from
    either question are left out)."""
    parent: dict[str, str] = {}
    uses: dict[str, int] = {}
    example: dict[str, str] = {}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    usable = []
    for row in rows:
        pair = [question_template(row.get(k) or "", row.get("subject") or "") for k in ("src", "rephrase")]
        if None in pair:
            continue  # a row without its subject in both questions says nothing of wording
        usable.append((row, pair[0]))
        for t in pair:
            parent.setdefault(t, t)
            example.setdefault(t, row["subject"])
            uses[t] = uses.get(t, 0) + 1
        parent[root(pair[0])] = root(pair[1])
    return RelationTemplates({t: root(t) for t in parent}, uses, example, usable)


def read_rows(path: Path = ROWS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_questions(rows: list[dict], seed: int = 0) -> list[tuple[str, str, list[str]]]:
    """(question, its rephrasing, the subject asked by other relations) per usable row."""
    bank = relation_templates(rows)
    best = {relation: members[0] for relation, members in bank.by_use().items()}
    relations = sorted(best)
    rng = random.Random(seed)
    out = []
    for row, template in bank.usable:
        own = bank.relation_of[template]
        others = [r for r in rng.sample(relations, NEGATIVES + 1) if r != own]
        negatives = [best[r].replace("{}", row["subject"], 1) for r in others[:NEGATIVES]]
        out.append((row["src"], row["rephrase"], negatives))
    return out


def fit_relation_map(means_of: Callable[[list[str]], torch.Tensor], rows: list[dict] | None = None,
                     seed: int = 0) -> torch.Tensor:
    """The server's map: `fit_map` on the bundled rows' training questions."""
    return fit_map(means_of, training_questions(read_rows() if rows is None else rows, seed), seed)


def fit_map(means_of: Callable[[list[str]], torch.Tensor],
            triples: list[tuple[str, str, list[str]]], seed: int = 0) -> torch.Tensor:
    """W (d_k, d_k), started at the identity, from (question, rephrasing, negatives) triples.
    `means_of(questions)`: their relation means (n, d_k) as second keys take them, questions
    asked alone in a chat turn."""
    questions = [q for a, p, negs in triples for q in (a, p, *negs)]
    means = means_of(questions).float().reshape(len(triples), 2 + NEGATIVES, -1)
    anchor, positive, negative = means[:, 0], means[:, 1], means[:, 2:]
    # Triples that share their question are not each other's in-batch negatives.
    first = {}
    asked = torch.tensor([first.setdefault(a, len(first)) for a, _, _ in triples])
    order = torch.Generator().manual_seed(seed)  # not the process's global RNG
    W = torch.nn.Parameter(torch.eye(means.shape[-1]))
    opt = torch.optim.Adam([W], lr=LR)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x @ W.T, dim=-1)

    for _ in range(EPOCHS):
        for idx in torch.randperm(len(triples), generator=order).split(BATCH):
            a, p, n = unit(anchor[idx]), unit(positive[idx]), unit(negative[idx])
            # The rephrasing first, then the row's hard negatives, then the batch's other
            # rephrasings (another subject and mostly another relation).
            others = (a @ p.T).masked_fill(asked[idx, None] == asked[None, idx], -2.0)
            logits = torch.cat([(a * p).sum(-1, keepdim=True),
                                torch.einsum("bd,bkd->bk", a, n), others], 1) / TEMPERATURE
            loss = torch.nn.functional.cross_entropy(
                logits, torch.zeros(len(idx), dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach()


def question_means(ref: ReferenceModel, router: Router, questions: list[str],
                   batch: int = 32) -> torch.Tensor:
    """Relation means (n, d_k) of chat questions asked alone, taken as a fact's second key is
    (zero for a question without relation words)."""
    return _fact_means(ref, router, [{"question": q, "answer": "-"} for q in questions], batch)


def prompt_means(ref: ReferenceModel, router: Router, prompts: list[str],
                 batch: int = 32) -> torch.Tensor:
    """`question_means` of completion prompts, as a completion fact's second key takes them."""
    return _fact_means(ref, router, [{"prompt": p, "completion": " -"} for p in prompts], batch)


def _fact_means(ref: ReferenceModel, router: Router, payloads: list[dict],
                batch: int) -> torch.Tensor:
    tok, marker = ref.tokenizer, user_turn_marker(ref.tokenizer)
    facts = [encode_fact(tok, payload, 1 << 16) for payload in payloads]
    means = torch.zeros(len(facts), router.d_k)
    for start in range(0, len(facts), batch):
        chunk = facts[start:start + batch]
        with torch.no_grad():
            h, _ = ref.lower(right_padded([f.prompt_ids for f in chunk]))
            raw = router.whiten(h)
        for j, (fact, fact_raw) in enumerate(zip(chunk, raw)):
            locus = choose_locus(fact, fact_raw[:len(fact.prompt_ids)], tok)
            mean = relation_mean(fact.prompt_ids, fact_raw, locus, tok, marker)
            if mean is not None:
                means[start + j] = mean
    return means
