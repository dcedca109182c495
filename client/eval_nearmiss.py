"""Near-miss prompts for `mome eval`, built by rule from the data (never hand-picked).

A case's *template* is its prompt with the subject replaced by "{}" (CounterFact prompts are
relation templates with the subject substituted; zsRE questions nearly always contain their
`subject` too). Two near misses per case, when the data allow them:

- `near_miss_entity`: another entity, same relation. The prompt of another row of the file
  with the same template whose subject is not memorized in this run (and which names no
  memorized subject). Rows of the template are taken in file order, the k-th case of a
  template getting the k-th such row (cyclically).
- `near_miss_relation`: the same entity, another relation. A template of another relation
  filled with this case's subject. The data carry no relation ids, so templates are grouped
  into relations conservatively: two templates are one relation when a row's paraphrase or
  locality prompt (CounterFact's neighbourhood prompts reuse the relation's templates) fits
  the other template. A template counts as *another* relation only when it lies in another
  group, the two groups' answer vocabularies (targets and true answers) are disjoint, and the
  two templates share no content word ("city of birth" / "born in which city" do share one).
  Eligible templates are ordered by how many rows use them, then alphabetically; case i takes
  the (i mod n)-th one whose filled prompt is not itself a memorized prompt.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from client.eval_data import EvalCase

STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how in is it its name of on "
    "or s that the their there this to type kind was were what when where which who whom "
    "whose with".split())


def template(case: EvalCase) -> str | None:
    """The case's prompt with its subject replaced by "{}" (None without a subject in it)."""
    if not case.subject or case.subject not in case.prompt:
        return None
    return case.prompt.replace(case.subject, "{}", 1)


def fill(tmpl: str, subject: str) -> str:
    return tmpl.replace("{}", subject, 1)


class SubjectMatcher:
    """Which of a set of subjects a text names (case-insensitive substring)."""

    def __init__(self, subjects):
        self.subjects = {s.lower() for s in subjects if s and s.strip()}
        self.short = [s for s in self.subjects if len(s) < 3]
        self.by_prefix: dict[str, list[str]] = defaultdict(list)
        for s in self.subjects:
            if len(s) >= 3:
                self.by_prefix[s[:3]].append(s)

    def find(self, text: str) -> str | None:
        low = text.lower()
        for i in range(len(low) - 2):
            for s in self.by_prefix.get(low[i:i + 3], ()):
                if low.startswith(s, i):
                    return s
        return next((s for s in self.short if s in low), None)


class Relations:
    """The templates of a data file, grouped into relations (see the module docstring)."""

    def __init__(self, pool: list[EvalCase]):
        self.rows: dict[str, list[EvalCase]] = defaultdict(list)
        for case in pool:
            if (t := template(case)) is not None:
                self.rows[t].append(case)
        self.parent = {t: t for t in self.rows}
        self._link_by_prompts(pool)
        self.answers: dict[str, set[str]] = defaultdict(set)
        for t, cases in self.rows.items():
            self.answers[self.group(t)].update(a.lower() for c in cases
                                               for a in (c.target, *c.answers))
        self.words = {t: set(re.findall(r"[a-z]+", t.lower())) - STOPWORDS for t in self.rows}
        self.order = sorted(self.rows, key=lambda t: (-len(self.rows[t]), t))
        self._eligible: dict[frozenset, list[str]] = {}

    def group(self, t: str) -> str:
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def _link_by_prompts(self, pool: list[EvalCase]) -> None:
        parts = {t: t.split("{}", 1) for t in self.rows
                 if len(t.replace("{}", "").strip()) >= 3}  # "{}" alone would fit anything
        for case in pool:
            own = template(case)
            if own is None:
                continue
            for text in (*case.paraphrases, *case.locality):
                for t, (pre, suf) in parts.items():
                    if (len(text) > len(pre) + len(suf) and text.startswith(pre)
                            and text.endswith(suf)):
                        self.parent[self.group(t)] = self.group(own)

    def other_relations(self, own: frozenset[str]) -> list[str]:
        """Templates of relations other than those of the templates in `own`."""
        if own not in self._eligible:
            groups = {self.group(t) for t in own}
            answers = set().union(*(self.answers[g] for g in groups))
            words = set().union(*(self.words[t] for t in own))
            self._eligible[own] = [
                t for t in self.order
                if self.group(t) not in groups and not self.answers[self.group(t)] & answers
                and not self.words[t] & words and len(t.replace("{}", "").strip()) >= 3]
        return self._eligible[own]


def attach_near_misses(cases: list[EvalCase], pool: list[EvalCase]) -> None:
    """Set `near_misses` on each case of the run; `pool`: every usable row of the file."""
    relations = Relations(pool)
    memorized = SubjectMatcher(c.subject for c in cases)
    prompts = {c.prompt for c in cases}
    by_subject: dict[str, set[str]] = defaultdict(set)  # memorized templates per subject
    for case in cases:
        if (t := template(case)) is not None:
            by_subject[case.subject.lower()].add(t)
    rank: Counter = Counter()
    free: dict[str, list[str]] = {}  # per template: prompts of rows naming no memorized subject
    for i, case in enumerate(cases):
        case.near_misses = []
        if (t := template(case)) is None:
            continue
        if t not in free:
            free[t] = [r.prompt for r in relations.rows[t] if memorized.find(r.prompt) is None]
        if free[t]:
            case.near_misses.append(("near_miss_entity", free[t][rank[t] % len(free[t])]))
        rank[t] += 1
        eligible = [u for u in relations.other_relations(frozenset(by_subject[case.subject.lower()]))
                    if fill(u, case.subject) not in prompts]
        if eligible:
            case.near_misses.append(("near_miss_relation", fill(eligible[i % len(eligible)],
                                                                case.subject)))

