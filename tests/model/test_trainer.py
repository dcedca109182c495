"""The trainer's split forward equals the plain one, and training memorizes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from model.config import MemoryConfig, TrainConfig
from model.facts import encode_fact
from model.memorize import Memorizer, answer_matches
from model.memory_runtime import load_memory
from model.reference import ReferenceServing
from tests.model.conftest import DATA


def _facts(reference, rows):
    return [encode_fact(reference.tokenizer, {"prompt": r["prompt"], "completion": r["target_new"],
                                              "subject": r["subject"]}, 512) for r in rows]


def _fresh_memory(reference, router_dir, tmp_path, cfg: MemoryConfig):
    """An empty store beside a copy of the test router, attached to the reference model."""
    shutil.copytree(router_dir, tmp_path / "router")
    memory = load_memory(tmp_path / "store", tmp_path / "router", cfg, reference.d_model)
    reference.attach(memory)
    return memory


# A made-up chat fact: nothing in the backbone knows it.
OSTRAVEL = ("Which river flows through the town of Ostravel?", "The Vesna river.")


def test_prefix_cached_upper_pass_matches_full_pass(reference, counterfact):
    facts = _facts(reference, counterfact[:3])
    width = max(len(f.ids) for f in facts)
    ids = torch.tensor([f.ids + [2] * (width - len(f.ids)) for f in facts])
    h, cached = reference.lower(ids)
    with torch.no_grad():
        full = reference.upper(h, cached)
        for split in (1, 4, width - 2):
            prefix = reference.upper_prefix(h, cached, split)
            suffix = reference.upper_suffix(h[:, split:], cached, split, prefix)
            torch.testing.assert_close(suffix, full[:, split:], atol=2e-4, rtol=1e-4)


def test_memorize_then_generate_and_forget(reference, router_dir, counterfact, tmp_path):
    cfg = MemoryConfig()
    memory = _fresh_memory(reference, router_dir, tmp_path, cfg)
    rows = counterfact[:6]
    facts = _facts(reference, rows)
    base = [reference.tokenizer.decode(reference.generate(
        reference.tokenizer(r["locality_prompt"]).input_ids, 12)) for r in rows]

    serving = ReferenceServing(reference)
    verify = serving.answers
    outcomes = Memorizer(reference, memory, TrainConfig()).memorize(
        list(range(1, 7)), facts, serving)
    assert all(o.memorized for o in outcomes), [o.error for o in outcomes]
    assert all(o.steps <= TrainConfig().max_steps for o in outcomes)
    for f in facts:
        assert answer_matches(verify([f])[0], f.answer_text)
    after = [reference.tokenizer.decode(reference.generate(
        reference.tokenizer(r["locality_prompt"]).input_ids, 12)) for r in rows]
    assert sum(a == b for a, b in zip(after, base)) >= 5
    memory.store.free(np.array([e for o in outcomes for e in o.expert_ids]))
    memory.refresh()
    assert not answer_matches(verify([facts[0]])[0], facts[0].answer_text)


def test_facts_with_colliding_loci_all_stay_memorized(reference, router_dir, tmp_path):
    """Four "<name> District" subjects key on the same token; memorized one after another,
    the later ones would fire the earlier ones' experts without per-expert gates."""
    from model.expert_gates import threshold_of

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows = [r for r in rows if r["subject"].endswith(" District")][:4]
    assert len(rows) == 4
    cfg = MemoryConfig()
    memory = _fresh_memory(reference, router_dir, tmp_path, cfg)
    facts = _facts(reference, rows)

    serving = ReferenceServing(reference)
    verify = serving.answers
    memorizer = Memorizer(reference, memory, TrainConfig())
    for owner, fact in enumerate(facts, start=1):
        [outcome] = memorizer.memorize([owner], [fact], serving,
                                       recall=lambda owners: [facts[o - 1] for o in owners])
        assert outcome.memorized, outcome.error
    assert [answer_matches(text, f.answer_text) for text, f in zip(verify(facts), facts)] == [
        True] * 4
    keys = memory.store.read_keys(memory.store.allocated_ids())
    assert (threshold_of(keys, cfg.gate) > cfg.gate + 1e-4).sum() >= 2  # gates were moved


def test_a_chat_fact_applies_to_the_turn_being_answered(reference, router_dir, tmp_path):
    """Posted without a subject: keyed on the guessed subject, trained alone and after an
    earlier exchange; answered later in another conversation, and silent once it is history."""
    cfg = MemoryConfig()
    memory = _fresh_memory(reference, router_dir, tmp_path, cfg)
    tok = reference.tokenizer
    question, answer = OSTRAVEL
    fact = encode_fact(tok, {"question": question, "answer": answer}, 512)
    assert tok.decode(fact.prompt_ids[slice(*fact.subject_span)]).strip() == "Ostravel"

    def reply(*turns: str) -> str:
        roles = ["user", "assistant"]
        ids = tok.apply_chat_template(
            [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
            tokenize=True, return_dict=False, add_generation_prompt=True)
        return tok.decode(reference.generate(ids, 12), skip_special_tokens=True)

    unrelated = "Name a primary colour."  # an exchange no training view contains
    later_base = reply(question, answer, unrelated)
    outcome, = Memorizer(reference, memory, TrainConfig()).memorize(
        [1], [fact], ReferenceServing(reference))
    assert outcome.memorized, outcome.error
    assert reply(question).startswith(answer)
    assert reply(unrelated, reply(unrelated), question).startswith(answer)
    # Behind a numbered reply the answer could copy the form of ("2. ..." after "1. ..."),
    # one no training view contains.
    listing = "List five fruits."
    assert reply(listing).startswith("1.")
    assert reply(listing, reply(listing), question).startswith(answer)
    assert reply(question, answer, unrelated) == later_base


def test_the_numbered_earlier_exchange_is_the_backbones_own_reply(reference, router_dir,
                                                                   tmp_path):
    """The second earlier exchange a chat fact trains behind is model-written: the backbone's
    greedy reply to its question, cut at 32 tokens (model/facts.py)."""
    from model.facts import EARLIER_EXCHANGES

    _fresh_memory(reference, router_dir, tmp_path, MemoryConfig())  # no expert of another test
    question, stored = EARLIER_EXCHANGES[1]
    prompt = encode_fact(reference.tokenizer, {"question": question, "answer": "-"}, 512)
    reply = reference.tokenizer.decode(reference.generate(prompt.prompt_ids, 32))
    assert reply.strip() == stored


def test_views_joining_once_the_fact_clears_still_answer_behind_the_exchange(
        reference, router_dir, tmp_path):
    """`views_after_facts`: the fact trains alone first; its view behind an earlier exchange
    joins after, and must answer too."""
    from model.facts import EARLIER_EXCHANGES

    memory = _fresh_memory(reference, router_dir, tmp_path, MemoryConfig())
    tok = reference.tokenizer
    question, answer = OSTRAVEL
    fact = encode_fact(tok, {"question": question, "answer": answer}, 512)
    outcome, = Memorizer(reference, memory, TrainConfig(views_after_facts=True)).memorize(
        [1], [fact], ReferenceServing(reference))
    assert outcome.memorized, outcome.error
    earlier_q, earlier_a = EARLIER_EXCHANGES[0]
    for turns in ([question], [earlier_q, earlier_a, question]):
        ids = tok.apply_chat_template(
            [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)],
            tokenize=True, return_dict=False, add_generation_prompt=True)
        assert tok.decode(reference.generate(ids, 12), skip_special_tokens=True).startswith(answer)


def test_a_fact_batched_with_slower_ones_trains_as_it_would_alone(reference, router_dir,
                                                                  tmp_path):
    """A fact and its views stop training once they clear: batched with facts that need more
    steps, its expert ends as it would alone, and the batch costs its own steps, not
    (facts x the slowest one's)."""
    from model.facts import history_views
    from model.trainer import train_facts

    # Views joining after the facts clear alone would add a second phase's steps (the
    # slowest fact's in each): this is about the one phase.
    cfg, train = MemoryConfig(), TrainConfig(views_after_facts=False)
    memory = _fresh_memory(reference, router_dir, tmp_path, cfg)
    rows = [json.loads(line) for line in (DATA.parent / "zsre-slice.jsonl").read_text()
            .splitlines()][:3]
    facts = [encode_fact(reference.tokenizer, {"question": r["src"], "answer": r["alt"]}, 512)
             for r in rows]
    memorizer = Memorizer(reference, memory, train)
    keys = memorizer.fact_keys(facts, *memorizer.keys_and_loci(facts))

    def trained(chosen: list[int]):
        views = [v for i in chosen for v in history_views(facts[i], reference.tokenizer, 1, 512)]
        return train_facts(reference, memory, [facts[i] for i in chosen], keys[chosen], train,
                           views=views)

    alone = [trained([i]) for i in range(3)]
    together = trained([0, 1, 2])
    assert len({a.steps for a in alone}) > 1, "the facts should need different step counts"
    assert together.steps == max(a.steps for a in alone)
    assert together.expert_steps == [a.steps for a in alone]  # each its own count
    for i, a in enumerate(alone):
        # Padding to another width rounds differently, and Adam scales a coordinate's tiny
        # gradient up to a full step: equal up to 1e-3 of the value's norm (measured: 1.5e-4;
        # an expert trained on past its own clearing moves by far more).
        drift = (together.values[i] - a.values[0]).norm() / a.values[0].norm()
        assert float(drift) < 1e-3, f"fact {i}: {float(drift):.2e} of its value's norm"


def test_a_key_on_a_shared_word_is_verified_on_the_stored_facts_it_fires_on(
        reference, router_dir, tmp_path):
    """Keyed on " within" (a subject given as that word), a new fact's expert fires on a
    stored prompt keyed on its own subject, far from the new key: the batch verifies that
    stored fact too, so it keeps its answer whether the new fact memorizes or not."""
    cfg = MemoryConfig()
    memory = _fresh_memory(reference, router_dir, tmp_path, cfg)
    tok = reference.tokenizer
    stored = encode_fact(tok, {"prompt": "Ostankinsky District is within", "completion": "Leeds",
                               "subject": "Ostankinsky District"}, 512)
    shared = encode_fact(tok, {"prompt": "home counties is within",
                               "completion": "Pennsylvania", "subject": "within"}, 512)
    facts = {1: stored, 2: shared}
    serving = ReferenceServing(reference)
    memorizer = Memorizer(reference, memory, TrainConfig())
    recall = lambda owners: [facts.get(o) for o in owners]  # noqa: E731
    [first] = memorizer.memorize([1], [stored], serving, recall=recall)
    assert first.memorized, first.error
    checked = []
    find = memorizer._fired_on_stored
    memorizer._fired_on_stored = lambda batch, recall: checked.extend(find(batch, recall)) or checked
    memorizer.memorize([2], [shared], serving, recall=recall)
    assert [fact for fact, _ in checked] == [stored]
    assert answer_matches(serving.answers([stored])[0], stored.answer_text)
    # The check kept the stored prompt's queries: the same as computed afresh (the layers
    # below the memory layer and the router are frozen), so the next batch pays no forward.
    kept = memorizer.turn_queries.of([1], recall=lambda owners: [None] * len(owners))
    torch.testing.assert_close(kept[1], memorizer._turn_queries([stored])[0])


def test_a_retried_chat_fact_is_retrained_behind_an_earlier_exchange_too(
        reference, router_dir, tmp_path, monkeypatch):
    """A retry (here forced: the first verification reports a miss) trains the fact with the
    views it was first trained with, so it still answers later in a conversation."""
    import model.memorize as memorize

    cfg = MemoryConfig()
    memory = _fresh_memory(reference, router_dir, tmp_path, cfg)
    tok = reference.tokenizer
    question, answer = OSTRAVEL
    fact = encode_fact(tok, {"question": question, "answer": answer}, 512)
    views_per_round = []
    train = memorize.train_facts

    def spy(*args, **kwargs):
        views_per_round.append(len(kwargs.get("views", ())))
        return train(*args, **kwargs)

    monkeypatch.setattr(memorize, "train_facts", spy)

    class MissOnce(ReferenceServing):
        def answers(self, facts):
            if len(views_per_round) == 1:
                return ["" for _ in facts]  # the first round "misses": a retry follows
            return super().answers(facts)

    outcome, = Memorizer(reference, memory, TrainConfig()).memorize(
        [1], [fact], MissOnce(reference))
    assert outcome.memorized, outcome.error
    assert len(views_per_round) == 2 and views_per_round[0] >= 1
    assert views_per_round[1] == views_per_round[0]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Name a primary colour."},
         {"role": "assistant", "content": "Red."}, {"role": "user", "content": question}],
        tokenize=True, return_dict=False, add_generation_prompt=True)
    assert tok.decode(reference.generate(ids, 12), skip_special_tokens=True).startswith(answer)


def _three_chat_facts_with_views(reference, router_dir, tmp_path):
    from model.facts import history_views

    memory = _fresh_memory(reference, router_dir, tmp_path, MemoryConfig())
    rows = [json.loads(line) for line in (DATA.parent / "zsre-slice.jsonl").read_text()
            .splitlines()][3:6]
    facts = [encode_fact(reference.tokenizer, {"question": r["src"], "answer": r["alt"]}, 512)
             for r in rows]
    memorizer = Memorizer(reference, memory, TrainConfig())
    keys = memorizer.fact_keys(facts, *memorizer.keys_and_loci(facts))
    views = [v for f in facts for v in history_views(f, reference.tokenizer, 1, 512)]
    return memory, facts, keys, views


def test_values_trained_in_bfloat16_are_returned_only_once_they_clear_in_float32(
        reference, router_dir, tmp_path):
    """`TrainConfig.dtype="bfloat16"` runs the steps' upper layers in a bf16 copy; what it
    returns was checked in float32, the precision served, so a float32 pass from those values
    needs no step and finds every fact and view clear."""
    from model.trainer import train_facts

    memory, facts, keys, views = _three_chat_facts_with_views(reference, router_dir, tmp_path)
    fast = train_facts(reference, memory, facts, keys, TrainConfig(dtype="bfloat16"), views=views)
    assert torch.bfloat16 in reference._uppers  # the steps ran in the copy
    assert min(fast.margin) >= TrainConfig().margin
    check = train_facts(reference, memory, facts, keys, TrainConfig(), views=views,
                        init_values=fast.values)
    assert check.steps == 1  # one forward, cleared: nothing updated
    torch.testing.assert_close(check.values, fast.values, rtol=0, atol=0)
    assert check.margin == pytest.approx(fast.margin, abs=1e-4)  # margins are float32's


def test_rows_that_clear_in_bfloat16_but_not_in_float32_train_on_in_float32(
        reference, router_dir, tmp_path, monkeypatch):
    """Forced: the bf16 pass reports every logit doubled, so rows clear there early and the
    float32 check finds them short. Training goes on in float32 until they clear there."""
    from model.trainer import train_facts

    memory, facts, keys, views = _three_chat_facts_with_views(reference, router_dir, tmp_path)
    float32_calls = []
    fp32 = reference.upper_in(torch.float32)
    head32 = fp32._head
    monkeypatch.setattr(fp32, "_head", lambda h, at: float32_calls.append(1) or head32(h, at))

    def trained() -> tuple:
        float32_calls.clear()
        result = train_facts(reference, memory, facts, keys, TrainConfig(dtype="bfloat16"),
                             views=views)
        return result, len(float32_calls)

    honest, check_only = trained()  # bf16 clears, the float32 check agrees: one pass per group
    bf16 = reference.upper_in(torch.bfloat16)
    head16 = bf16._head
    monkeypatch.setattr(bf16, "_head", lambda h, at: 2 * head16(h, at))
    doubled, calls = trained()
    assert calls > check_only  # float32 steps after the check
    # The last expert to clear did so in float32, at the last step (not where it first froze).
    assert max(doubled.expert_steps) == doubled.steps
    assert max(honest.expert_steps) <= honest.steps
    assert min(doubled.margin) >= TrainConfig().margin  # and float32's margins clear
    assert min(honest.margin) >= TrainConfig().margin
