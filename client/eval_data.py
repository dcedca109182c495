"""Reading knowledge-editing data for `mome eval`: cases, held-out texts, and the bad rows.

Real data is messy (zsRE dev row 627 has an empty `alt`): a row without a usable prompt or
answer is reported with its line number and skipped, never the end of a run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# The fields that must hold non-empty text, per format: (prompt field, answer field).
REQUIRED = {"counterfact": ("prompt", "target_new"), "zsre": ("src", "alt"),
            "jsonl": ("prompt", "target")}


@dataclass
class EvalCase:
    prompt: str
    target: str
    chat: bool
    subject: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)
    neighbour_truths: list[str] = field(default_factory=list)  # locality prompt + true answer
    answers: list[str] = field(default_factory=list)  # the true answers (relation vocabulary)
    line: int = 0  # 1-based line of the data file
    near_misses: list[tuple[str, str]] = field(default_factory=list)  # (kind, prompt)

    def fact(self, with_subject: bool = True) -> dict:
        body = ({"question": self.prompt, "answer": self.target} if self.chat
                else {"prompt": self.prompt, "completion": self.target})
        if with_subject and self.subject and self.subject in self.prompt:
            body["subject"] = self.subject
        return body


@dataclass
class Loaded:
    cases: list[EvalCase]
    truths: list[str]  # true statements usable as a held-out text set for perplexity
    bad: list[dict]  # {"line", "reason"} of the rows skipped


class BadRow(ValueError):
    pass


def read_cases(path: str, fmt: str) -> Loaded:
    """Every usable row of the file as a case; the others as bad rows with their reason."""
    if fmt not in REQUIRED:
        raise ValueError(f"unknown format {fmt!r}")
    loaded = Loaded([], [], [])
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            case, truth = _case(_row(line, fmt), fmt, number)
        except BadRow as exc:
            loaded.bad.append({"line": number, "reason": str(exc)})
            continue
        loaded.cases.append(case)
        if truth:
            loaded.truths.append(truth)
    return loaded


def load_cases(path: str, fmt: str) -> tuple[list[EvalCase], list[str]]:
    """Cases (bad rows skipped), and true statements usable as a held-out text set."""
    loaded = read_cases(path, fmt)
    return loaded.cases, loaded.truths


def typed_in_lower_case(case: EvalCase) -> EvalCase:
    """The case as a user who types in lower case asks it: the memorized question, its
    rephrasings and its subject lower-cased; the answer and the locality prompts as they are."""
    return dataclasses.replace(case, prompt=case.prompt.lower(),
                               paraphrases=[p.lower() for p in case.paraphrases],
                               subject=case.subject.lower() if case.subject else None)


def _row(line: str, fmt: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(f"not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise BadRow("not a JSON object")
    for name in REQUIRED[fmt]:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadRow(f"empty {name}" if name in row else f"no {name}")
    return row


def _case(r: dict, fmt: str, line: int) -> tuple[EvalCase, str | None]:
    try:
        if fmt == "counterfact":
            return (EvalCase(r["prompt"], r["target_new"], False, r.get("subject"),
                             [r["rephrase_prompt"]], [r["locality_prompt"]],
                             [f"{r['locality_prompt']} {r['locality_ground_truth']}."],
                             [r["ground_truth"]], line),
                    f"{r['prompt']} {r['ground_truth']}.")
        if fmt == "zsre":
            return (EvalCase(r["src"], r["alt"], True, r.get("subject"),
                             [r["rephrase"]] if r.get("rephrase") else [],
                             [r["loc"]] if r.get("loc") else [],
                             answers=list(r.get("answers") or []), line=line),
                    f"{r['loc']} {r['loc_ans']}" if r.get("loc") and r.get("loc_ans") else None)
        return (EvalCase(r["prompt"], r["target"], bool(r.get("chat", False)), r.get("subject"),
                         list(r.get("paraphrases") or []), list(r.get("locality_prompts") or []),
                         answers=list(r.get("answers") or []), line=line), None)
    except KeyError as exc:
        raise BadRow(f"no {exc.args[0]}") from None


def held_out_texts(cases: list[EvalCase], truths: list[str], n_memorized: int,
                   size: int = 200) -> list[str]:
    """A fixed text set no memorized fact rewrites, for perplexity before and after.

    The true statements of the rows after the memorized ones; when the file has too few
    left (a run over all of it), the neighbours' true statements, from the last row back:
    the memorized rows' own true statements are what the counterfactuals contradict.
    """
    rest = truths[n_memorized:n_memorized + size]
    if len(rest) == size or not any(c.neighbour_truths for c in cases):
        return rest or truths[:size]
    rewritten = set(truths[:n_memorized])  # some neighbours are memorized rows themselves
    texts = [t for c in reversed(cases) for t in c.neighbour_truths if t not in rewritten]
    return texts[:size]


def superseded(cases: list[EvalCase]) -> set[int]:
    """Cases asked again later with the same prompt: the server keeps the later answer
    (CounterFact has 56 such prompts, e.g. five twin cities of Tirana)."""
    last = {(c.prompt, c.chat): i for i, c in enumerate(cases)}
    return {i for i, c in enumerate(cases) if last[(c.prompt, c.chat)] != i}


def normalized(text: str) -> str:
    return " ".join(text.split())


def starts_with(generated: str, target: str) -> bool:
    return normalized(generated).startswith(normalized(target))


def answer_tokens(target: str) -> int:
    """Enough tokens to see whether the output starts with the target, for any byte-level
    BPE tokenizer: each token covers at least one byte of UTF-8, so the target's length in
    bytes (plus a leading space or newline) always suffices. Counting words did not:
    "Jean-Baptiste-Alexandre Massy" is two words and eleven tokens, and its output, cut at
    ten, was scored a miss."""
    return min(64, len(target.encode()) + 2)
