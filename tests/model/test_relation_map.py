"""The learned relation map (model/relation_map.py): what it trains on, that training pulls
rephrasings together and pushes other relations away, and that the router keeps it."""

from __future__ import annotations

import pytest
import torch

from model.relation_map import NEGATIVES, fit_relation_map, training_questions
from model.router import CHAT_MAP, COMPLETION_MAP, Router

ROWS = [
    {"subject": f"S{i}x", "src": src.format(f"S{i}x"), "rephrase": reph.format(f"S{i}x")}
    for i, (src, reph) in enumerate([
        ("Who is the mother of {}?", "Who is {}'s mother?"),
        ("Where was {} born?", "What is the birthplace of {}?"),
        ("What is {}'s occupation?", "What does {} do for a living?"),
        ("Which country is {} in?", "In what country is {}?"),
        ("Who designed {}?", "Who was the designer of {}?"),
        ("When was {} founded?", "What year was {} founded?"),
    ] * 50)
] + [{"subject": "Nowhere", "src": "Who is the mother of Ann?", "rephrase": "Ann's mother?"}]


def test_training_questions_ask_the_same_subject_by_other_relations_only():
    triples = training_questions(ROWS)
    assert len(triples) == len(ROWS) - 1  # the row whose subject its questions lack is skipped
    for (question, rephrase, negatives), row in zip(triples, ROWS):
        assert (question, rephrase) == (row["src"], row["rephrase"])
        assert len(negatives) == NEGATIVES
        for negative in negatives:
            assert row["subject"] in negative
            # Another relation: neither this row's question nor its rephrasing, re-subjected.
            template = negative.replace(row["subject"], "{}")
            assert template not in (row["src"].replace(row["subject"], "{}"),
                                    row["rephrase"].replace(row["subject"], "{}"))


def synthetic_means(d: int = 32):
    """Relation means made of the subject (largest), the relation's meaning and each wording's
    own part (larger than the meaning): raw, a question about the same subject in another
    relation often sits closer than the question's rephrasing, as in real relation means."""
    gen = torch.Generator().manual_seed(0)
    relation = {}  # template -> its relation direction
    subject = {}

    def direction(table, name):
        if name not in table:
            table[name] = torch.randn(d, generator=gen)
        return table[name]

    groups = {}
    for row in ROWS[:-1]:
        for text in (row["src"], row["rephrase"]):
            groups[text.replace(row["subject"], "{}")] = row["src"].replace(row["subject"], "{}")

    def means_of(questions):
        out = []
        for q in questions:
            name = next(r["subject"] for r in ROWS if r["subject"] in q)
            template = q.replace(name, "{}")
            wording = direction(relation, template)  # each wording its own small part
            meaning = direction(relation, "rel:" + groups.get(template, template))
            out.append(3 * direction(subject, name) + meaning + 1.5 * wording)
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    return means_of


def margins(means_of, W: torch.Tensor) -> torch.Tensor:
    """Per row: cos(question, rephrasing) less the best cos(question, another relation)."""
    out = []
    for question, rephrase, negatives in training_questions(ROWS):
        m = torch.nn.functional.normalize(means_of([question, rephrase, *negatives]) @ W.T, dim=-1)
        out.append(m[0] @ m[1] - (m[2:] @ m[0]).max())
    return torch.stack(out)


def test_the_map_pulls_rephrasings_closer_than_other_relations_of_the_subject():
    means_of = synthetic_means()
    before = margins(means_of, torch.eye(32))
    W = fit_relation_map(means_of, ROWS)
    after = margins(means_of, W)
    assert (before < 0).float().mean() > 0.3  # raw, these rows let a near miss pass first
    assert (after > 0).all() and after.mean() > before.mean() + 0.25


def test_the_router_keeps_its_map_and_a_router_without_one_compares_raw(tmp_path):
    gen = torch.Generator().manual_seed(1)
    router = Router(torch.randn(8, generator=gen), torch.randn(4, 8, generator=gen))
    means = torch.randn(3, 4, generator=gen)
    assert torch.allclose(router.relation_view(means), torch.nn.functional.normalize(means, dim=-1))
    W = torch.randn(4, 4, generator=gen)
    mapped = router.with_relation(W)
    assert mapped.fingerprint() != router.fingerprint()
    mapped.save(tmp_path / "mapped", {})
    router.save(tmp_path / "raw", {})
    loaded = Router.load(tmp_path / "mapped")
    assert torch.allclose(loaded.relation_view(means),
                          torch.nn.functional.normalize(means @ W.T, dim=-1))
    assert Router.load(tmp_path / "raw").relation is None
    (tmp_path / "mapped" / "router.json").write_text((tmp_path / "raw" / "router.json").read_text())
    with pytest.raises(ValueError, match="fingerprint"):
        Router.load(tmp_path / "mapped")  # a map swapped in is caught


def test_each_row_is_viewed_through_its_own_map_and_the_router_keeps_both(tmp_path):
    gen = torch.Generator().manual_seed(2)
    chat, completion = torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen)
    router = Router(torch.randn(8, generator=gen), torch.randn(4, 8, generator=gen), chat)
    both = router.with_relation(chat, completion)
    assert (router.map_for("completion"), both.map_for("completion"), both.map_for("chat")) == \
        (CHAT_MAP, COMPLETION_MAP, CHAT_MAP)
    assert (router.map_name(CHAT_MAP), both.map_name(COMPLETION_MAP)) == ("chat", "completion")
    assert Router(router.mean, router.projection).map_name(CHAT_MAP) is None
    means = torch.randn(3, 4, generator=gen)
    unit = torch.nn.functional.normalize
    viewed = both.relation_view(means, torch.tensor([COMPLETION_MAP, CHAT_MAP, COMPLETION_MAP]))
    assert torch.allclose(viewed[[0, 2]], unit(means[[0, 2]] @ completion.T, dim=-1))
    assert torch.allclose(viewed[1], unit(means[1] @ chat.T, dim=-1))
    assert torch.allclose(both.relation_view(means), unit(means @ chat.T, dim=-1))
    # A key taken through a map the router lacks is never compared at another map's gate.
    with pytest.raises(AssertionError, match="completion map"):
        router.relation_view(means, torch.ones(3, dtype=torch.long))
    # The chat-only router's fingerprint is what it was before completion maps existed.
    assert both.fingerprint() != router.fingerprint()
    both.save(tmp_path / "both", {})
    loaded = Router.load(tmp_path / "both")
    assert torch.equal(loaded.completion_relation, both.completion_relation)
    assert loaded.fingerprint() == both.fingerprint()


def test_the_bundled_router_has_a_map_that_separates_real_questions(reference, router_dir):
    """On the real backbone: the fitted map puts a question's rewording nearer than another
    question about the same subject, where raw means do not (questions not in the data)."""
    from model.relation_map import question_means

    router = Router.load(router_dir)
    assert router.relation is not None
    questions = ["Who is the chief engineer of Project Zephyr?",
                 "Who is the lead engineer on Project Zephyr?",
                 "What is the budget of Project Zephyr?"]
    raw = torch.nn.functional.normalize(question_means(reference, router, questions), dim=-1)
    mapped = router.relation_view(question_means(reference, router, questions))
    assert mapped[0] @ mapped[1] - mapped[0] @ mapped[2] > raw[0] @ raw[1] - raw[0] @ raw[2]


def test_the_bundled_completion_map_blocks_a_near_miss_the_chat_map_lets_through(
        reference, router_dir):
    """On the real backbone, completion prompts not in the data, at the served gates: the
    chat map passes another relation of the same subject, the completion map does not, and
    both pass the rewording."""
    from model.config import MemoryConfig
    from model.relation_map import prompt_means

    router = Router.load(router_dir)
    prompts = ["The chief engineer of Project Zephyr is", "Project Zephyr's chief engineer is",
               "The budget of Project Zephyr is"]
    means = prompt_means(reference, router, prompts)
    for index, name in ((CHAT_MAP, "chat"), (COMPLETION_MAP, "completion")):
        viewed = router.relation_view(means, torch.full((3,), index))
        gate = MemoryConfig().relation_gate("completion", name)
        assert viewed[0] @ viewed[1] >= gate
        assert (viewed[0] @ viewed[2] >= gate) == (name == "chat")


def test_the_default_gate_follows_the_router_and_a_set_gate_wins():
    from model.config import MemoryConfig

    default = MemoryConfig()
    assert default.relation_gate("chat", "chat") < default.relation_gate("chat", None)
    assert default.relation_gate("completion", "completion") == 0.423
    assert default.relation_gate("completion", "chat") == 0.160  # a store made before its map
    assert default.relation_gate("completion", None) == 0.178  # a store made before both
    assert MemoryConfig(relation_gate_chat=0.0).relation_gate("chat", "chat") == 0.0
    assert MemoryConfig(relation_gate_chat=0.6).relation_gate("chat", None) == 0.6
    assert MemoryConfig(relation_gate_completion=0.3).relation_gate("completion", "completion") == 0.3
