"""The subject guessed for facts posted without one (model/subject_guess.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.subject_guess import guess_subject

DATA = Path(__file__).resolve().parents[1] / "data"


def guessed(text: str) -> str | None:
    span = guess_subject(text)
    return None if span is None else text[span[0]:span[1]]


@pytest.mark.parametrize("text, subject", [
    ("What is Rosa Chacel's country of citizenship?", "Rosa Chacel"),
    ("Which country is Kayunga District in?", "Kayunga District"),
    ("The official religion of Edwin of Northumbria is", "Edwin of Northumbria"),
    ("What is the twin city of Lyon? It is", "Lyon"),  # a sentence break ends a name
    ("What war was USS Clover (1863) in?", "USS Clover (1863)"),
    ("Who is the chief engineer of Project Zephyr?", "Project Zephyr"),
    ("When does the Marlowe Library open on Sundays?", "Marlowe Library"),
    ("Livingston F.C. is headquartered in", "Livingston F.C."),
])
def test_the_subject_is_the_longest_run_of_capitalised_words(text, subject):
    assert guessed(text) == subject


def test_no_guess_without_a_capitalised_word_but_the_opener():
    assert guessed("what is the capital of france?") is None
    assert guessed("Who wrote it?") is None


def _rows(name: str, question, subject):
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines()]
    return [(question(r), subject(r)) for r in rows if subject(r)]


@pytest.mark.parametrize("rows", [
    _rows("zsre-slice.jsonl", lambda r: r["src"], lambda r: r["subject"]),
    _rows("counterfact-slice.jsonl", lambda r: r["prompt"], lambda r: r["subject"]),
], ids=["zsre", "counterfact"])
def test_the_guess_ends_where_the_real_subject_ends(rows):
    """The key sits on the guess's last token: it must be the subject's last token."""
    same_end = 0
    for text, subject in rows:
        span = guess_subject(text)
        start = text.find(subject)
        same_end += span is not None and start >= 0 and span[1] == start + len(subject)
    assert same_end >= 0.9 * len(rows), (same_end, len(rows))
