"""A fact's key also covers its prompt in other contexts: a chat question asked later in a
conversation, a completion prompt behind other text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import MemoryConfig, TrainConfig
from model.expert_gates import OWN_LOCUS_MARGIN, lean_toward
from model.facts import CONTEXT_PREFIXES, context_views, encode_fact
from model.memorize import Memorizer
from model.reference import ReferenceServing
from tests.model.conftest import DATA

ZSRE = Path(__file__).resolve().parents[1] / "data" / "zsre-slice.jsonl"


def _chat_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in ZSRE.read_text().splitlines()]
    return [r for r in rows if r["alt"].strip()][:n]


def _chat_fact(reference, question: str, answer: str, earlier: list[dict] = ()):
    messages = [*earlier, {"role": "user", "content": question}]
    return encode_fact(reference.tokenizer, {"messages": messages, "answer": answer}, 2048)


def test_leaning_stops_where_the_key_would_no_longer_fire_on_its_own_question():
    alone = torch.nn.functional.normalize(torch.randn(64, 32), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(64, 32), dim=-1)
    near, far = (torch.nn.functional.normalize(alone + s * noise, dim=-1) for s in (0.1, 1.5))
    floor = 0.985
    # Close queries: the plain mean; far ones: as far as the floor allows, and no further.
    assert torch.allclose(lean_toward(alone, near, floor),
                          torch.nn.functional.normalize(alone + near, dim=-1), atol=1e-6)
    own = (lean_toward(alone, far, floor) * alone).sum(-1)
    assert bool((own >= floor - 1e-5).all()) and bool((own <= floor + 1e-4).all())


def _completion_facts(reference, n: int):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:n]
    return rows, [encode_fact(reference.tokenizer, {"prompt": r["prompt"],
                                                    "completion": r["target_new"]}, 512)
                  for r in rows]


def test_a_completion_key_leans_toward_the_same_locus_behind_the_prefixes(reference, memorizer):
    m = memorizer()
    _, [fact] = _completion_facts(reference, 1)  # "The mother tongue of Danielle Darrieux is"
    alone, [locus] = m.keys_and_loci([fact])
    views = context_views(fact, reference.tokenizer, len(CONTEXT_PREFIXES), 2048)
    ats = [len(v.prompt_ids) - (len(fact.prompt_ids) - locus) for v in views]
    assert len(views) == 6 and all(v.prompt_ids[at] == fact.prompt_ids[locus]
                                   for v, at in zip(views, ats))
    floor = MemoryConfig().max_threshold + OWN_LOCUS_MARGIN
    toward = torch.nn.functional.normalize(m.keys_for(views, ats).mean(0, keepdim=True), dim=-1)
    key = m.fact_keys([fact])
    assert torch.allclose(key, lean_toward(alone, toward, floor), atol=1e-6)
    assert floor - 1e-4 <= float(key[0] @ alone[0]) < 0.9999  # leans, still fires alone
    # Switched off: the prompt-alone key.
    plain = Memorizer(reference, m.memory, TrainConfig(key_behind_prefixes=False))
    assert torch.equal(plain.fact_keys([fact]), alone)


def test_more_completion_rephrasings_behind_other_text_reach_the_gate(reference, memorizer):
    # The data's own rephrasings (often behind unrelated text) are never training views: the
    # key leans toward the locus behind the trainer's fixed prefixes only.
    m = memorizer()
    rows, facts = _completion_facts(reference, 40)
    alone, loci = m.keys_and_loci(facts)
    keys = m.fact_keys(facts, alone, loci)
    best_alone, best_leaned = [], []
    for row, a, k in zip(rows, alone, keys):
        rephrased = encode_fact(reference.tokenizer, {"prompt": row["rephrase_prompt"],
                                                      "completion": row["target_new"]}, 512)
        with torch.no_grad():
            h, _ = reference.lower(torch.tensor([rephrased.prompt_ids]))
        unit = torch.nn.functional.normalize(m.memory.router.whiten(h[0]), dim=-1)
        best_alone.append(float((unit @ a).max()))
        best_leaned.append(float((unit @ k).max()))
    # Offline, rows 0-199: 129 against 106 (reports/prefix-key-offline).
    gate = MemoryConfig().gate
    assert sum(b >= gate for b in best_leaned) > sum(b >= gate for b in best_alone)


def test_keys_at_given_loci_are_the_whole_prompts_keys_in_the_facts_order(reference, memorizer,
                                                                          monkeypatch):
    # Keys at known loci run each prompt only up to its locus, shortest first, in batches:
    # the same keys as the whole prompts', each back at its own fact.
    monkeypatch.setattr("model.memorize.KEY_BATCH", 4)
    m = memorizer()
    _, facts = _completion_facts(reference, 9)
    views = [v for f in facts for v in context_views(f, reference.tokenizer, 2, 512)]
    # Up to the end and far before it (a subject's last token is often mid-prompt).
    loci = [len(v.prompt_ids) - 1 - (i % 3) * 3 for i, v in enumerate(views)]
    assert loci != sorted(loci)  # the batches run in another order than the facts'
    keys = m.keys_for(views, loci)
    with torch.no_grad():
        whole = torch.stack([
            torch.nn.functional.normalize(m.memory.router.whiten(
                reference.lower(torch.tensor([v.prompt_ids]))[0][0, at]), dim=-1)
            for v, at in zip(views, loci)])
    assert len(set(loci)) > 3 and torch.allclose(keys, whole, atol=1e-5)


@pytest.mark.parametrize("first, then", [(True, False), (False, True)])
def test_a_completion_fact_posted_again_replaces_one_keyed_under_the_other_setting(
        reference, memorizer, first, then):
    # Stored under one lean setting, posted again with another answer under the other: the
    # leaned key sits at 0.985 of the prompt-alone one, and must still be found.
    stored = memorizer(key_behind_prefixes=first)
    _, [old] = _completion_facts(reference, 1)
    recall = lambda owners: [old if o == 1 else None for o in owners]  # noqa: E731
    [before] = stored.memorize([1], [old], ReferenceServing(reference), recall=recall)
    assert before.memorized
    new = encode_fact(reference.tokenizer, {"prompt": old.payload["prompt"],
                                            "completion": " Zanzibar"}, 512)
    [after] = Memorizer(reference, stored.memory, TrainConfig(key_behind_prefixes=then)).memorize(
        [2], [new], ReferenceServing(reference), recall=recall)
    assert after.memorized and after.replaced == [1]
    store = stored.memory.store
    assert store.owner_of(store.allocated_ids()).tolist() == [2]


def test_a_chat_key_is_the_same_asked_alone_and_after_an_unrelated_exchange(reference,
                                                                          memorizer):
    """The router reads the turn being answered as if asked alone (ReferenceModel.routed), so
    the query at a question's locus no longer moves behind a history: the key needs no lean
    toward it. The earlier exchange here is the data's own unrelated question."""
    m = memorizer()
    rows = _chat_rows(12)
    facts = [_chat_fact(reference, r["src"], r["alt"]) for r in rows]
    later = [_chat_fact(reference, r["src"], r["alt"], [
        {"role": "user", "content": r["loc"]},
        {"role": "assistant", "content": r["loc_ans"]}]) for r in rows]
    keys, loci = m.keys_and_loci(facts)
    later_keys, later_loci = m.keys_and_loci(later)
    # The same token, counted from the end of the prompt.
    assert [len(f.prompt_ids) - at for f, at in zip(facts, loci)] == \
        [len(f.prompt_ids) - at for f, at in zip(later, later_loci)]
    assert torch.allclose(later_keys, keys, atol=1e-5)
    assert torch.equal(m.fact_keys(facts), keys)  # stored as taken: no lean
