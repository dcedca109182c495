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
    ("iCloud is created by", "iCloud"),  # a capital inside the word counts
])
def test_the_subject_is_the_longest_run_of_capitalised_words(text, subject):
    assert guessed(text) == subject


@pytest.mark.parametrize("text, subject", [
    # Keyed on the most salient token instead, the first fact fired on every "X is within".
    ("home counties is within", "home counties"),
    ("intelligence agency's area of work is", "intelligence agency"),
    ("The official religion of sheikh is", "sheikh"),
    ("table tennis was formulated in", "table tennis"),
    ("in portugal, an official language is", "portugal"),
    ("what is the capital of france?", "france"),
    ("what date did sidney painter die?", "sidney painter"),
    ("which country is kayunga district in?", "kayunga district"),
    ("which team does brett mclean play for?", "brett mclean"),
    ("what was magic slim's career?", "magic slim"),
    ("when does the marlowe library open on sundays?", "marlowe library"),
    ("who wrote hamlet?", "hamlet"),
])
def test_without_capitals_the_subject_is_the_plain_run_the_sentence_is_about(text, subject):
    assert guessed(text) == subject


def test_no_guess_when_every_word_is_a_function_word():
    assert guessed("What is it?") is None


def _rows(name: str, question, subject):
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines()]
    return [(question(r), subject(r)) for r in rows if subject(r)]


@pytest.mark.parametrize("rows", [
    _rows("zsre-slice.jsonl", lambda r: r["src"], lambda r: r["subject"]),
    _rows("counterfact-slice.jsonl", lambda r: r["prompt"], lambda r: r["subject"]),
], ids=["zsre", "counterfact"])
@pytest.mark.parametrize("lower_case, floor", [(False, 0.9), (True, 0.75)], ids=["as-posted",
                                                                              "lower-case"])
def test_the_guess_ends_where_the_real_subject_ends(rows, lower_case, floor):
    """The key sits on the guess's last token: it must be the subject's last token, also
    for users who type in lower case (0.84 of all zsRE dev questions then, 0.91 of CounterFact;
    as posted 0.96 / 0.97)."""
    same_end = 0
    for text, subject in rows:
        if lower_case:
            text, subject = text.lower(), subject.lower()
        span = guess_subject(text)
        start = text.find(subject)
        same_end += span is not None and start >= 0 and span[1] == start + len(subject)
    assert same_end >= floor * len(rows), (same_end, len(rows))
