"""Other wordings of a chat fact's question, trained with it (paraphrase augmentation).

A value trained under one wording of a question often does not move the answer under another
even where the expert fires: of the held-out zsRE rephrasings missed with the relation map,
11 of 46 fired and still answered wrong (reports/METHODS.md). Physics of LMs 3.1 (arXiv
2309.14316) finds that knowledge seen under several wordings is extracted from new ones, and
LocFT-BF (arXiv 2509.22072) gains 10-33 points of generality by training edits behind
model-written prefixes.

The wordings come from a bank of question templates grouped into relations
(model/relation_map.py `relation_templates`, zsRE rows 100-399: never the evaluation's own
rows; a template seen with another subject can still word a question as an evaluation's
rephrasing does, 6 of 200 held-out rows, reported apart in reports/METHODS.md). A question
is matched to the bank template whose relation mean is nearest its own through the
router's relation map; when that match is close enough, the relation's other templates,
most used first, filled with the question's subject (given or guessed), are asked with the
same answer and trained wherever the fact's expert fires.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.expert_gates import OWN_LOCUS_MARGIN
from model.relation_key import scaled_key
from model.relation_map import read_rows, relation_templates
from model.subject_guess import guess_subject

# Cosine (through the relation map) a question's relation mean must reach with a bank
# template for the question to be taken as that relation.
MATCH = 0.8

_BUILT: dict[str, Rewordings] = {}  # router fingerprint -> the bundled bank's


def normal(text: str) -> str:
    return " ".join(text.lower().split())


class Rewordings:
    """The template bank, its relations and each template's mapped relation mean."""

    def __init__(self, means_of: Callable[[list[str]], torch.Tensor],
                 rows: list[dict] | None = None):
        bank = relation_templates(read_rows() if rows is None else rows)
        self.members = bank.by_use()
        self.templates = sorted(bank.relation_of)
        self.relation_of = bank.relation_of
        # Each template's mean, filled with a subject it was seen with (the words around a
        # subject move with it a little; a real one keeps the mean as the data asks it).
        self.means = torch.nn.functional.normalize(means_of(
            [t.replace("{}", bank.example[t], 1) for t in self.templates]), dim=-1)

    @classmethod
    def cached(cls, router_fingerprint: str, means_of: Callable[[list[str]], torch.Tensor]
               ) -> Rewordings:
        """The bundled bank for a router, built once per process (a few seconds of the
        backbone's lower layers over its templates)."""
        if router_fingerprint not in _BUILT:
            _BUILT[router_fingerprint] = cls(means_of)
        return _BUILT[router_fingerprint]

    def relation(self, mean: torch.Tensor) -> str | None:
        """The bank relation of a question's unit relation mean (None: no close template)."""
        if not len(self.templates) or not bool(mean.any()):
            return None
        cos = self.means @ torch.nn.functional.normalize(mean, dim=-1)
        best = int(cos.argmax())
        return self.relation_of[self.templates[best]] if float(cos[best]) >= MATCH else None

    def of(self, question: str, subject: str | None, mean: torch.Tensor, n: int) -> list[str]:
        """Up to `n` other wordings of `question` about `subject` (guessed when None)."""
        if n <= 0:
            return []
        if not subject:
            guessed = guess_subject(question)
            if guessed is None:
                return []
            subject = question[guessed[0]:guessed[1]]
        relation = self.relation(mean)
        if relation is None or subject not in question:
            return []
        own = normal(question)
        out = []
        for template in self.members[relation]:
            asked = template.replace("{}", subject, 1)
            if normal(asked) != own:
                out.append(asked)
            if len(out) == n:
                break
        return out


def joined_key(own_key: torch.Tensor, wordings: torch.Tensor, gate: float) -> torch.Tensor:
    """A fact's second key joined with its wordings' unit relation means (n, d_k): the unit
    centroid of its own mean and theirs, scaled to `gate`. The own key is kept where there
    are no wordings, or where the centroid would not pass the fact's own question (the
    wordings of one relation are chained by rows, and can lie far from this question)."""
    if not len(wordings):
        return own_key
    own = torch.nn.functional.normalize(own_key, dim=-1)
    centroid = torch.nn.functional.normalize(own + wordings.sum(0), dim=-1)
    if float(centroid @ own) < gate + OWN_LOCUS_MARGIN:
        return own_key
    return scaled_key(centroid, gate)
