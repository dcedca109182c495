"""Other surface forms of a question, by plain rules of English (paraphrase augmentation).

The template bank (model/rewordings.py) rewords only questions whose relation it knows: 76 of
200 held-out zsRE questions matched none, and their rephrasings were answered 0.72 of the
time against 0.86 for the reworded ones (reports/METHODS.md). Many rephrasings people write
differ from the question in a few function words: "What is X's Y?" / "What is the Y of X?",
"What city" / "Which city", "Who was the Y" / "Who is the Y", "What is" / "What's". Those
alternations hold for any relation, so they reword the questions the bank does not know.

Each rule keeps the question's meaning, so the answer stays right; a rule that could change
it is not applied: the tense moves only from past to present and only at the copula before
the thing asked about ("Who is the president of France?" asked in the past has another
answer), and nothing inside the subject is touched ("Who directed Paris is Burning?"). The
rules were written from the tuning rows (zsRE 0-59), never from evaluation rows.
"""

from __future__ import annotations

import re

_WH = r"(what|which|who|where|when)"
_BE = r"(is|was|are|were)"
# Words after an opening "What" that make it a pronoun, not a determiner: "Which" would
# not do there ("What is ...", "What happened to ...", "What about ...").
_NOT_NOUNS = {"is", "was", "are", "were", "does", "did", "do", "has", "have", "had", "can",
              "could", "will", "would", "should", "if", "about", "of", "else", "happens",
              "causes", "makes", "means", "'s", "’s", "s"}


def _cased(word: str, like: str) -> str:
    """`word` capitalised as `like` is (users type "what is ..." as often as "What is")."""
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _possessive_to_of(question: str, subject: str) -> str | None:
    """'What is X's Y?' -> 'What is the Y of X?'"""
    m = re.fullmatch(rf"{_WH} {_BE} {re.escape(subject)}['’]s? (.+?)\s*\??", question, re.I)
    if not m:
        return None
    return f"{m[1]} {m[2]} the {m[3]} of {subject}?"


def _of_to_possessive(question: str, subject: str) -> str | None:
    """'What is the Y of X?' -> 'What is X's Y?' (Y a plain noun phrase: 'the name of the
    father of X' would split at the wrong 'of')."""
    m = re.fullmatch(rf"{_WH} {_BE} the (.+?) of {re.escape(subject)}\s*\??", question, re.I)
    if not m or re.search(r"\b(of|for)\b", m[3]):
        return None
    mark = "'" if subject.endswith("s") else "'s"
    return f"{m[1]} {m[2]} {subject}{mark} {m[3]}?"


def _what_which(question: str) -> str | None:
    """'What city ...' <-> 'Which city ...': the opening word, before a noun only."""
    m = re.match(r"(what|which) (\S+)", question, re.I)
    if not m:
        return None
    after = m[2].lower()
    if after in _NOT_NOUNS or after.endswith("ed"):
        return None
    other = "which" if m[1].lower() == "what" else "what"
    return _cased(other, m[1]) + question[len(m[1]):]


def _past_to_present(question: str, subject: str | None) -> str | None:
    """'Who was the mother of X?' -> 'Who is the mother of X?', 'What was X's career?' ->
    'What is X's career?': the opening copula, before 'the' or the subject's possessive only
    (a past event, 'What was X known for?', 'Who was X born to?', stays past)."""
    thing = "the " + (f"|{re.escape(subject)}['’]" if subject else "")
    m = re.match(rf"{_WH} (was|were) ({thing})", question, re.I)
    if not m:
        return None
    present = {"was": "is", "were": "are"}[m[2].lower()]
    return question[:m.start(2)] + _cased(present, m[2]) + question[m.end(2):]


def _contraction(question: str) -> str | None:
    """'What is' <-> 'What's' at the question's opening."""
    m = re.match(rf"{_WH}( is|['’]s) ", question, re.I)
    if not m:
        return None
    swapped = "'s" if m[2] == " is" else " is"
    return m[1] + swapped + question[m.end(2):]


def surface_forms(question: str, subject: str | None) -> list[str]:
    """Other forms of `question` (about `subject`, when known), the largest changes first:
    the possessive turned, then the opening word, the tense, the contraction."""
    question = " ".join(question.split())
    subject = " ".join(subject.split()) if subject else None
    if subject and subject not in question:
        subject = None
    candidates = []
    if subject:
        candidates += [_possessive_to_of(question, subject),
                       _of_to_possessive(question, subject)]
    candidates += [_what_which(question), _past_to_present(question, subject),
                   _contraction(question)]
    out: list[str] = []
    for form in candidates:
        if form and form != question and form not in out:
            out.append(form)
    return out
