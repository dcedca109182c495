"""Facts as token sequences: the prompt the server will see, the answer tokens, the locus.

The locus is the prompt token whose query keys the fact's expert: the last token of the
fact's subject (where factual recall happens, per ROME/MEMIT), given or found automatically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.subject_guess import guess_subject
from model.turn_scope import turn_words, user_turn_marker


class FactError(ValueError):
    """A fact that cannot be memorized as posted (the API answers 422 with this message)."""


@dataclass
class EncodedFact:
    prompt_ids: list[int]
    answer_ids: list[int]
    answer_text: str  # what greedy generation must start with
    kind: str  # "chat" | "completion"
    # Token span [start, end) of the subject: given, or guessed from the question's words.
    subject_span: tuple[int, int] | None
    payload: dict  # the fact as posted

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


def join_completion(prompt: str, completion: str) -> str:
    """The completion as it must follow the prompt: one space between words unless present."""
    if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
        return " " + completion
    return completion


def _token_span(offsets: list[tuple[int, int]], start_char: int, end_char: int
                ) -> tuple[int, int] | None:
    tokens = [i for i, (a, b) in enumerate(offsets) if a < end_char and b > start_char]
    return (tokens[0], tokens[-1] + 1) if tokens else None


def _subject_span(offsets: list[tuple[int, int]], text: str, subject: str | None,
                  search_from: int, search_to: int) -> tuple[int, int] | None:
    """The given subject's tokens, or (without one) the guessed subject's in the question."""
    if not subject:
        question = text[search_from:search_to]
        guessed = guess_subject(question)
        if guessed is None:
            return None
        return _token_span(offsets, search_from + guessed[0], search_from + guessed[1])
    start_char = text.rfind(subject, search_from)
    if start_char < 0:
        return None
    return _token_span(offsets, start_char, start_char + len(subject))


def encode_fact(tokenizer, payload: dict, max_len: int) -> EncodedFact:
    """Token sequences of a validated fact payload (see server/facts_protocol.py)."""
    subject = payload.get("subject")
    if payload.get("prompt") is not None:
        prompt = payload["prompt"]
        answer_text = join_completion(prompt, payload["completion"])
        enc = tokenizer(prompt, return_offsets_mapping=True)
        prompt_ids, offsets = enc.input_ids, enc.offset_mapping
        full = tokenizer(prompt + answer_text).input_ids
        if full[: len(prompt_ids)] == prompt_ids:
            answer_ids = full[len(prompt_ids):]
        else:  # the join re-tokenized the prompt's end: keep the prompt as the server sees it
            answer_ids = tokenizer(answer_text, add_special_tokens=False).input_ids
        kind = "completion"
    else:
        messages = payload.get("messages") or [{"role": "user", "content": payload["question"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        prompt_ids, offsets = enc.input_ids, enc.offset_mapping
        search_from = text.rfind(messages[-1]["content"])
        answer_text = payload["answer"]
        # The chat answer ends the turn: train the end-of-turn token so the reply stops there.
        answer_ids = (tokenizer(answer_text, add_special_tokens=False).input_ids
                      + [tokenizer.eos_token_id])
        kind = "chat"
    if not answer_ids or not answer_text.strip():
        raise FactError("the answer is empty")
    if len(prompt_ids) + len(answer_ids) > max_len:
        raise FactError(f"prompt and answer are {len(prompt_ids) + len(answer_ids)} tokens; "
                        f"the limit is {max_len}")
    if kind == "chat":
        span = _subject_span(offsets, text, subject, search_from,
                             search_from + len(messages[-1]["content"]))
    else:
        span = _subject_span(offsets, prompt, subject, 0, len(prompt))
    if subject and span is None:
        raise FactError(f"subject {subject!r} does not occur in the prompt")
    fact = EncodedFact(prompt_ids, answer_ids, answer_text, kind, span, payload)
    content = content_positions(fact, tokenizer)
    if not content:
        # Checked here, at admission: choose_locus would otherwise fail the whole batch.
        raise FactError("the prompt has no content tokens to key the fact on")
    if not subject and span is not None and span[1] - 1 not in content:
        fact.subject_span = None  # a guess that fell on special tokens ("<|im_end|>")
    return fact


def content_positions(fact: EncodedFact, tokenizer) -> list[int]:
    """Prompt positions that carry the user's words (not template or special tokens)."""
    marker = None if fact.kind == "completion" else user_turn_marker(tokenizer)
    return turn_words(fact.prompt_ids, set(tokenizer.all_special_ids), marker)


def choose_locus(fact: EncodedFact, queries_raw: torch.Tensor, tokenizer) -> int:
    """The prompt position whose query keys the fact.

    With a subject (given or guessed): its last token. Without: the content token whose
    whitened hidden state is farthest from the calibration mean (the rarest, most entity-like
    token): names and other specific words stand out there, template and relation words do not.
    """
    if fact.subject_span is not None:
        return fact.subject_span[1] - 1
    candidates = content_positions(fact, tokenizer)
    if not candidates:
        raise FactError("the prompt has no content tokens to key the fact on")
    norms = queries_raw[candidates].norm(dim=-1)
    return candidates[int(norms.argmax())]


# Unrelated sentences a fact is also trained behind (ROME trains its values under varied
# prefixes too): a paraphrase or a conversation rarely starts with the fact's own words.
CONTEXT_PREFIXES = [
    "Here is something I read today.",
    "The weather was cold and the train was late.",
    "Answer the following carefully.",
    "Many people are surprised to learn this.",
    "This is a short note about history and culture.",
    "We talked about many things last night.",
]


# Earlier exchanges a chat fact is also trained behind: asked later in a conversation, the
# question's expert still fires (only in the turn being answered, model/turn_scope.py) but
# the history shifts the states its value must move. Generic on purpose: never evaluation data.
EARLIER_EXCHANGES = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level."),
    # The backbone's own greedy reply, cut at 32 tokens: a numbered, repetitive reply, the
    # form later answers were seen to copy ("2. ..." after "1. ...", "nq:" after "nq:").
    ("Count from one to ten.", "1. 1\n2. 2\n3. 3\n4. 4\n5. 5\n6. 6\n7."),
    ("Hi! I have a question for you.", "Sure, I am happy to help. What would you like to know?"),
]


def history_views(fact: EncodedFact, tokenizer, n: int, max_len: int) -> list[EncodedFact]:
    """A chat fact asked after the first `n` earlier exchanges, same answer."""
    if fact.kind != "chat":
        return []
    messages = fact.payload.get("messages") or [
        {"role": "user", "content": fact.payload["question"]}]
    views = []
    for question, answer in EARLIER_EXCHANGES[:n]:
        earlier = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        payload = {k: v for k, v in fact.payload.items() if k != "question"}
        try:
            views.append(encode_fact(tokenizer, {**payload, "messages": earlier + messages},
                                     max_len))
        except FactError:
            break
    return views


def last_question(payload: dict) -> str:
    """A chat fact's question: its last user turn."""
    return (payload.get("messages") or [{"content": payload.get("question")}])[-1]["content"]


def _asked_as(payload: dict, content: str) -> dict:
    """A chat fact's payload with its last user turn replaced by `content`."""
    messages = [dict(m) for m in (payload.get("messages")
                                  or [{"role": "user", "content": payload["question"]}])]
    messages[-1]["content"] = content
    out = {**payload, "messages": messages}
    out.pop("question", None)
    return out


def context_views(fact: EncodedFact, tokenizer, n: int, max_len: int) -> list[EncodedFact]:
    """The fact behind the first `n` context prefixes, same answer."""
    views = []
    for prefix in CONTEXT_PREFIXES[:n]:
        payload = dict(fact.payload)
        if fact.kind == "completion":
            payload["prompt"] = f"{prefix} {payload['prompt']}"
        else:
            payload = _asked_as(payload, f"{prefix} {last_question(payload)}")
        try:
            views.append(encode_fact(tokenizer, payload, max_len))
        except FactError:
            break  # too long behind a prefix: train it in its own context only
    return views


def reworded_view(fact: EncodedFact, question: str, tokenizer, max_len: int
                  ) -> EncodedFact | None:
    """A chat fact asked as `question` instead, same answer (None when it does not fit)."""
    try:
        return encode_fact(tokenizer, _asked_as(fact.payload, question), max_len)
    except FactError:
        return None
