"""The subject of a fact posted without one, guessed from its words.

Users post "What is Rosa Chacel's country of citizenship?", not a `subject` field. The key
of a fact must sit on the entity the question is about: keyed on the last token of the
subject, a key fires on nearly all rephrasings of its question and almost never on other
questions; keyed on the token that merely looks rarest ("name", "label", "what"), it fires on
any question that opens the same way (measured in issue 12 / reports/METHODS.md).

The rule is plain on purpose: the longest run of capitalised words (names may contain "of",
"de", "the"... between capitalised words), ignoring a sentence-initial question word. A capital
or digit anywhere in a word counts ("iCloud", "sRGB", "c2c").

Text with no such word ("home counties is within", "what is the capital of france?") gets the
run of plain words the sentence is about: the first one in a statement, the last one in a
question. Without it the key would fall on whichever token stands out, which can be a word
as common as " within" and then fires on every "X is within" prompt (reports/METHODS.md).
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
    return any(c.isupper() or c.isdigit() for c in word)


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
        return _plain_subject(text, words, gap)
    # Longest run; ties go to the later one (questions name their subject after the opener).
    best = max(runs, key=lambda r: (len(r), r[0]))
    start, end = words[best[0]][0], words[best[-1]][1]
    if "(" in text[start:end] and text[end:end + 1] == ")":
        end += 1  # "USS Clover (1863)"
    return _trimmed(text, start, end)


# Words that end a lower-case subject: verbs and auxiliaries of relation phrases, relative
# pronouns, prepositions, articles and question words. Not a tagger; a short closed list.
_VERBS = {"is", "was", "are", "were", "be", "been", "being", "can", "could", "has", "have",
          "had", "do", "does", "did", "will", "would", "shall", "should", "may", "might",
          "must", "works", "work", "worked", "play", "plays", "speaks", "speak", "belongs",
          "belong", "made", "born", "died", "located", "written", "known", "held", "used",
          "follows", "writes", "performs", "originates", "lost", "spoke", "holds", "declares",
          "started", "owns", "professionally", "wrote", "won", "sang", "built", "began",
          "became", "led", "taught", "drew", "gave", "took", "ran", "met", "left"}
_WH = {"what", "which", "who", "whom", "whose", "where", "when", "how"}
# First words that make a text a question.
_ASKING = {"what", "which", "who", "whom", "whose", "when", "where", "why", "how", "is", "was",
           "are", "were", "did", "does", "do", "can", "could", "would", "will", "should",
           "has", "have", "had", "whats", "what's", "who's", "where's", "when's", "how's",
           "name", "tell", "list", "give"}
_STOPS = _VERBS | _OPENERS | {"within", "into", "about", "under", "over", "between", "and",
                               "or", "part"}
_POSSESSIVE_S = re.compile(r"['’]s?$")


def _is_verb(lower: str) -> bool:
    return lower in _VERBS or (len(lower) > 4 and lower.endswith("ed"))


def _plain_subject(text: str, words: list, gap) -> tuple[int, int] | None:
    """The subject of a text without capitalised words: a run of words that are no stop
    word; a possessive ends it ("intelligence agency's area"); in a statement, the first
    run ("table tennis was formulated in"), in a question the last run, or the run after
    "did"/"does" less its verb ("what date did sidney painter die?")."""
    lowers = [w[2].lower() for w in words]
    is_question = text.rstrip().endswith("?") or (bool(words) and lowers[0] in _ASKING)
    runs: list[list[int]] = []
    for j, lower in enumerate(lowers):
        possessive = bool(_POSSESSIVE_S.search(lower)) and lower not in _STOPS
        if lower in _STOPS or (_is_verb(lower) and not possessive):
            runs.append([])
            continue
        if not runs or not runs[-1] or _BREAK.search(gap(j)):
            runs.append([])
        runs[-1].append(j)
        # "rosa chacel's country", but not "which country's citizen was ..."
        if possessive and not (runs[-1][0] and lowers[runs[-1][0] - 1] in _WH):
            return _span(text, words, runs[-1])
    runs = [r for r in runs if r]
    if not runs:
        return None
    if is_question:
        # "when does the library open on sundays?": the subject sits between "does" and the
        # verb; otherwise at the end ("what is the capital of france?").
        asked = [r for r in runs if _after_do(lowers, r[0])]
        if not asked:
            return _span(text, words, runs[-1])
        run = asked[0]
        after = lowers[run[-1] + 1] if run[-1] + 1 < len(words) else ""
        if len(run) > 1 and not _is_verb(after):
            run = run[:-1]  # its last word is the verb: "what date did sidney painter die?"
        return _span(text, words, run)
    # A statement opening with an article names the relation first ("the official
    # religion of sheikh is"), else the subject ("table tennis was formulated in").
    return _span(text, words, runs[1] if lowers[0] in {"the", "a", "an"} and len(runs) > 1
                 else runs[0])


def _after_do(lowers: list[str], j: int) -> bool:
    """Word j follows "did"/"does"/"do", an article between them allowed."""
    j -= 1
    if j >= 0 and lowers[j] in {"the", "a", "an"}:
        j -= 1
    return j >= 0 and lowers[j] in {"did", "does", "do"}


def _span(text: str, words: list, run: list[int]) -> tuple[int, int]:
    return _trimmed(text, words[run[0]][0], words[run[-1]][1])


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    trimmed = _POSSESSIVE.sub("", text[start:end])  # "Chacel's" -> "Chacel"
    return (start, start + len(trimmed) if trimmed else end)
