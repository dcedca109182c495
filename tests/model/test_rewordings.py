"""Other wordings of a chat fact's question (model/rewordings.py): which relation a question
is matched to, what is filled in, and that the views keep the fact's answer and history."""

from __future__ import annotations

import numpy as np
import torch

from model.facts import encode_fact, reworded_view
from model.memorize import _Batch
from model.reference import ReferenceServing
from model.rewordings import Rewordings, joined_key
from model.router import Router

RELATIONS = [
    ["Who is the mother of {}?", "Who is {}'s mother?", "Who was {}'s mother?"],
    ["Where was {} born?", "What is the birthplace of {}?"],
    ["Which company makes {}?", "Who manufactures {}?"],
]
# Rows as the data has them: a question and its rephrasing, so wordings chain into relations.
# The first wording of each relation is asked most often.
ROWS = [{"subject": f"Name{i}", "src": r[0].format(f"Name{i}"), "rephrase": w.format(f"Name{i}")}
        for r in RELATIONS for i, w in enumerate(r[1:] * 2)]


def template_means(questions: list[str], d: int = 16) -> torch.Tensor:
    """A relation direction per relation, whatever the subject and wording."""
    out = []
    for q in questions:
        found = [k for k, r in enumerate(RELATIONS) for t in r
                 if t.split("{}")[0] in q and t.split("{}")[1] in q]
        out.append(torch.eye(d)[found[0]] if found else torch.eye(d)[d - 1])
    return torch.stack(out)


def test_a_question_is_asked_by_its_relation_s_other_templates_most_used_first():
    bank = Rewordings(template_means, ROWS)
    question = "Who is the mother of Ada Quill?"
    got = bank.of(question, None, template_means([question])[0], n=5)
    assert got == ["Who is Ada Quill's mother?", "Who was Ada Quill's mother?"]
    assert bank.of(question, None, template_means([question])[0], n=1) == got[:1]
    assert bank.of(question, "Ada Quill", template_means([question])[0], n=0) == []


def test_no_rewordings_without_a_close_relation_or_a_subject():
    bank = Rewordings(template_means, ROWS)
    far = torch.eye(16)[15]  # no template's relation
    assert bank.of("Who is the mother of Ada Quill?", None, far, n=3) == []
    assert bank.of("Who is the mother of Ada Quill?", None, torch.zeros(16), n=3) == []
    mean = template_means(["Who is the mother of Ada Quill?"])[0]
    assert bank.of("Who is she?", None, mean, n=3) == []  # no subject found
    # A given subject is used as given, and must be in the question.
    assert bank.of("Who is the mother of Ada Quill?", "Ada Quill", mean, n=1) == [
        "Who is Ada Quill's mother?"]
    assert bank.of("Who is the mother of Ada Quill?", "Bob", mean, n=1) == []


def test_a_joined_second_key_is_the_centroid_unless_it_leaves_the_own_question():
    gate = 0.5
    own_key = torch.eye(4)[0] / gate  # stored scaled, as relation_key.scaled_key does
    near = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), dim=-1)
    joined = joined_key(own_key, near, gate)
    assert torch.allclose(joined * gate, torch.nn.functional.normalize(
        torch.tensor([1.0 + near[0, 0], near[0, 1], 0.0, 0.0]), dim=-1))
    far = -torch.eye(4)[:1] * 0.95 + torch.eye(4)[1:2] * 0.3  # would leave the own question
    assert torch.equal(joined_key(own_key, far, gate), own_key)
    assert torch.equal(joined_key(own_key, torch.zeros(0, 4), gate), own_key)


def test_a_reworded_view_keeps_the_answer_and_the_history(reference):
    tok = reference.tokenizer
    fact = encode_fact(tok, {"messages": [
        {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who is the mother of Ada Quill?"}],
        "answer": "Mara Quill"}, 2048)
    view = reworded_view(fact, "Who is Ada Quill's mother?", tok, 2048)
    assert view.answer_ids == fact.answer_ids and view.kind == "chat"
    text = tok.decode(view.prompt_ids)
    assert "Hi!" in text and "Who is Ada Quill's mother?" in text
    assert "Who is the mother" not in text
    assert reworded_view(fact, "x " * 3000, tok, 2048) is None  # too long: left out


def test_the_bundled_bank_rewords_a_new_question_and_not_small_talk(reference, router_dir):
    """On the real backbone and the shipped template rows: a question of a known relation,
    about a subject not in the data, gets other wordings about that subject."""
    from model.relation_map import question_means

    router = Router.load(router_dir)
    bank = Rewordings.cached(router.fingerprint(), lambda qs: router.relation_view(
        question_means(reference, router, qs)))
    questions = ["Who is the mother of Zorbax Quill?", "Tell me a joke about cats."]
    means = router.relation_view(question_means(reference, router, questions))
    got = bank.of(questions[0], None, means[0], n=3)
    assert got and all("Zorbax Quill" in q and q != questions[0] for q in got)
    assert any("mother" in q for q in got)
    assert bank.of(questions[1], None, means[1], n=3) == []


QUESTION, ANSWER = "Who is the mother of Zorbax Quill?", "Mara Vell"
WORDING = "Who is Zorbax Quill's mother?"


def _memorized(reference, memorizer, **train):
    fact = encode_fact(reference.tokenizer, {"question": QUESTION, "answer": ANSWER}, 2048)
    m = memorizer(**train)
    _, _, [own] = m._keys([fact], with_relations=True)
    [outcome] = m.memorize([1], [fact], ReferenceServing(reference))
    assert outcome.memorized
    stored = m.store.read_relations(np.array(outcome.expert_ids))[0]
    view = reworded_view(fact, WORDING, reference.tokenizer, 2048)
    [served] = ReferenceServing(reference).answers([view])
    return m, own, stored, served, reference.tokenizer.decode(view.answer_ids)


def test_a_chat_fact_is_trained_in_other_wordings_and_keyed_on_their_centroid(reference,
                                                                             memorizer):
    """Memorized with its rewordings, a new chat fact's second key is the centroid of its
    own and the wordings' relation means, and a wording it was trained in is answered
    exactly (the answer, then the end of the turn)."""
    m, own, stored, served, exact = _memorized(reference, memorizer)
    assert WORDING in m.rewordings().of(QUESTION, None, torch.from_numpy(own), 3)
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(stored),
                                                torch.from_numpy(own), dim=0)
    assert 0.5 < float(cos) < 0.999  # moved toward the wordings, still the question's
    assert served == exact


def test_without_rewordings_the_key_is_the_question_s_own_and_the_wording_is_missed(
        reference, memorizer):
    """The same fact with `reworded_views=0`: its own second key, and the wording gets a
    wrong end ("Mara Vellus": the value trained in one wording only). Asserted so the test
    above can be seen to fail without the wordings. Held at one earlier-exchange view: the
    second (a numbered reply, the default since) already carries this value to the wording
    without them, as a later lever rightly may."""
    _, own, stored, served, exact = _memorized(reference, memorizer, reworded_views=0,
                                               history_views=1)
    assert np.allclose(stored, own, atol=1e-5)
    assert served != exact


def test_a_store_whose_router_has_no_map_is_not_reworded(reference, memorizer):
    """A store made before the relation map keeps raw means, which the bank's match
    threshold was never measured on: its chat facts keep their own key and no views."""
    m = memorizer()
    m.memory.router = Router(m.memory.router.mean, m.memory.router.projection)
    fact = encode_fact(reference.tokenizer, {"question": QUESTION, "answer": ANSWER}, 2048)
    batch = _Batch(owners=[1], facts=[fact])
    _, _, batch.relations = m._keys([fact], with_relations=True)
    own = batch.relations.copy()
    m._reword(batch)
    assert not batch.reworded and np.array_equal(batch.relations, own)
