"""The prompts `mome eval` generates on ("probes"), and the logs their outputs are kept in.

Every probe has a stable key `kind:case:j`, so the outputs recorded before memorization
(`base_outputs.jsonl`) and after it (`outputs_after.jsonl`) are appended as they come and a
resumed run generates only what is missing. Kinds, and what a hit is:

- `reliability` (every case), `paraphrase`: the output starts with the target.
- `locality`, `near_miss_entity`, `near_miss_relation`: the output (first 16 tokens) is
  the base model's output.
- `turn_unrelated_after_fact` (chat): [question, its answer, the case's locality question]:
  the output is the base model's output for that same conversation.
- `turn_fact_after_unrelated` (chat): [locality question, the base model's answer to it,
  the question]: the output starts with the target.
- `in_context`, `in_context_paraphrase` (`--baseline in-context`, base model only): the
  reliability and paraphrase prompts with the fact stated ("Fact: {prompt} {target}.\\n"
  before a completion prompt, a system message "Fact: {question} {answer}" for chat): the
  base model's output starts with the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from client.eval_data import EvalCase, answer_tokens

LOCALITY_TOKENS = 16
TARGET = "target"  # a hit: the output starts with the target
UNCHANGED = "unchanged"  # a hit: the output equals the base model's


@dataclass(frozen=True)
class Generation:
    text: str
    facts: list[str]  # the `mome_facts` of the response: memorized facts that fired


@dataclass(frozen=True)
class Probe:
    kind: str
    case: int
    j: int
    prompt: str | list[dict]  # a chat probe may be a whole conversation
    chat: bool
    max_tokens: int
    expect: str  # TARGET or UNCHANGED
    before: bool  # generated on the base model (before anything is memorized)
    after: bool  # generated after memorization

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.case}:{self.j}"

    def job(self) -> tuple[str | list[dict], bool, int]:
        return self.prompt, self.chat, self.max_tokens


@dataclass(frozen=True)
class Plan:
    """Which cases get which probes: every case its reliability prompt; the sampled ones
    the rest; superseded ones nothing after memorization that expects their target."""
    sampled: frozenset[int]
    replaced: frozenset[int]
    in_context: bool = False

    def probes(self, cases: list[EvalCase], base: dict[str, Generation]) -> list[Probe]:
        """All probes; the one that needs a base answer first only once that is recorded."""
        return [p for i, c in enumerate(cases) for p in self.case_probes(i, c, base)]

    def case_probes(self, i: int, c: EvalCase, base: dict[str, Generation]) -> list[Probe]:
        s, cur, answer = i in self.sampled, i not in self.replaced, answer_tokens(c.target)
        out = [Probe("reliability", i, 0, c.prompt, c.chat, answer, TARGET, s, cur)]
        if not s:
            return out
        out += [Probe("paraphrase", i, j, p, c.chat, answer, TARGET, True, cur)
                for j, p in enumerate(c.paraphrases)]
        out += [Probe("locality", i, j, p, c.chat, LOCALITY_TOKENS, UNCHANGED, True, True)
                for j, p in enumerate(c.locality)]
        out += [Probe(kind, i, 0, p, c.chat, LOCALITY_TOKENS, UNCHANGED, True, True)
                for kind, p in c.near_misses]
        if c.chat and c.locality:
            out += _turn_probes(i, c, base, cur)
        if self.in_context and cur:
            out += [Probe(kind, i, j, with_fact(c, p), c.chat, answer, TARGET, True, False)
                    for j, (kind, p) in enumerate([("in_context", c.prompt)] + [
                        ("in_context_paraphrase", p) for p in c.paraphrases])]
        return out


def _turn_probes(i: int, c: EvalCase, base: dict[str, Generation], current: bool) -> list[Probe]:
    unrelated = c.locality[0]
    out = [Probe("turn_unrelated_after_fact", i, 0, [
        _user(c.prompt), {"role": "assistant", "content": c.target}, _user(unrelated)],
        True, LOCALITY_TOKENS, UNCHANGED, True, True)]
    reply = base.get(f"locality:{i}:0")
    if reply is not None and current:
        out.append(Probe("turn_fact_after_unrelated", i, 0, [
            _user(unrelated), {"role": "assistant", "content": reply.text.strip()},
            _user(c.prompt)], True, answer_tokens(c.target), TARGET, True, True))
    return out


def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def with_fact(c: EvalCase, prompt: str) -> str | list[dict]:
    """The prompt with the case's fact stated in it (the in-context baseline)."""
    if c.chat:
        return [{"role": "system", "content": f"Fact: {c.prompt} {c.target}"}, _user(prompt)]
    return f"Fact: {c.prompt} {c.target}.\n{prompt}"


class OutputLog:
    """Generations by probe key, appended to a JSONL file as they come (None: memory only)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Generation] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.data[row["key"]] = Generation(row["text"], row["facts"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interruption

    def add(self, items: dict[str, Generation]) -> None:
        self.data.update(items)
        if self.path is not None and items:
            with self.path.open("a") as f:
                f.writelines(json.dumps({"key": k, "text": g.text, "facts": g.facts}) + "\n"
                             for k, g in items.items())

    def reset(self) -> None:
        self.data = {}
        if self.path is not None:
            self.path.unlink(missing_ok=True)
