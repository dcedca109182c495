"""The subject of a fact posted without one, guessed from its words.

Users post "What is Rosa Chacel's country of citizenship?", not a `subject` field. The key
of a fact must sit on the entity the question is about: keyed on the last token of the
subject, a key fires on nearly all rephrasings of its question and almost never on other
questions; keyed on the token that merely looks rarest ("name", "label", "what"), it fires on
any question that opens the same way (measured in issue 12 / reports/METHODS.md).

The rule is plain on purpose: the longest run of capitalised words (names may contain "of",
"de", "the"... between capitalised words), ignoring a sentence-initial question word.
Lower-case questions get no guess, and the caller falls back to the rarest-token locus.
"""

from __future__ import annotations

import re

# A word: letters, digits and the punctuation names carry inside them.
_WORD = re.compile(r"[\w][\w'’.\-&]*", re.UNICODE)
# Lower-case words allowed inside a name when capitalised words follow them.
_CONNECTORS = {"of", "the", "de", "del", "della", "da", "di", "du", "la", "le", "von", "van",
               "der", "den", "y", "and", "&", "for", "on", "upon", "in", "al", "el", "bin",
               "ibn", "des", "to", "a"}
# Sentence openers that are capitalised only because they open the sentence.
_OPENERS = {"what", "which", "who", "whom", "whose", "when", "where", "why", "how", "in",
            "on", "at", "the", "a", "an", "is", "was", "are", "were", "did", "does", "do",
            "name", "tell", "please", "can", "could", "would", "will", "give", "list", "from",
            "for", "by", "of", "to", "with", "as", "this", "that", "these", "those", "it",
            "its", "there", "after", "before", "during", "since", "if", "my", "our", "your",
            "i", "we", "you", "he", "she", "they", "has", "have", "had", "should", "whats",
            "what's", "who's", "where's", "when's", "how's"}
_SENTENCE_END = re.compile(r"[.?!:;]")
_BREAK = re.compile(r"[.?!:;,\"“”]")  # punctuation between two words ends a name
_POSSESSIVE = re.compile(r"(['’]s?|[\-]+)$")


def _capitalised(word: str) -> bool:
    return word[0].isupper() or word[0].isdigit()


def guess_subject(text: str) -> tuple[int, int] | None:
    """Character span [start, end) of the likely subject of `text`, or None."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    def gap(j: int) -> str:  # what separates word j from the one before it
        return text[words[j - 1][1]:words[j][0]] if j else ""

    def opens_sentence(j: int) -> bool:
        return j == 0 or bool(_SENTENCE_END.search(gap(j)))

    runs: list[list[int]] = []  # word indexes of each run
    i = 0
    while i < len(words):
        if not _capitalised(words[i][2]) or (opens_sentence(i)
                                             and words[i][2].lower() in _OPENERS):
            i += 1
            continue
        run = [i]
        j = i + 1
        while j < len(words) and not _BREAK.search(gap(j)):
            word = words[j][2]
            if _capitalised(word):
                run.append(j)
                j += 1
                continue
            # Connectors join two capitalised words only ("Bank of America").
            k = j
            while (k < len(words) and not _BREAK.search(gap(k))
                   and words[k][2].lower() in _CONNECTORS and not _capitalised(words[k][2])):
                k += 1
            if k > j and k < len(words) and not _BREAK.search(gap(k)) and _capitalised(words[k][2]):
                run.extend(range(j, k + 1))
                j = k + 1
                continue
            break
        runs.append(run)
        i = j
    if not runs:
        return None
    # Longest run; ties go to the later one (questions name their subject after the opener).
    best = max(runs, key=lambda r: (len(r), r[0]))
    start, end = words[best[0]][0], words[best[-1]][1]
    if "(" in text[start:end] and text[end:end + 1] == ")":
        end += 1  # "USS Clover (1863)"
    trimmed = _POSSESSIVE.sub("", text[start:end])  # "Chacel's" -> "Chacel"
    end = start + len(trimmed) if trimmed else end
    return (start, end)
