"""A fact's second key (model/relation_key.py): which words it is taken over, how the store
keeps it, and that the memory layer silences a firing whose request asks something else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expert_store.config import StoreConfig
from expert_store.store import ExpertStore
from model.config import MemoryConfig
from model.memory_layer import RequestWords
from model.relation_key import (
    mean_without,
    passes,
    relation_positions,
    scaled_key,
    unit_sum,
    words_digest,
)
from model.turn_scope import user_turn_marker


def chat_ids(tok, *turns: str) -> list[int]:
    """A conversation whose user turns are `turns` (answered "Sure."), asked for the last."""
    messages = []
    for i, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": "Sure."})
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                   return_dict=False)


def words_at(tok, ids, positions) -> str:
    return "".join(tok.decode([ids[i]]) for i in positions)


def test_relation_words_are_the_last_turn_outside_its_subject(reference):
    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    ids = chat_ids(tok, "Who founded Acme?", "What is the capital city of Upper Volta?")
    words = words_at(tok, ids, relation_positions(ids, tok, marker))
    assert words.strip() == "What is the capital city of?"
    assert "Acme" not in words and "user" not in words and "assistant" not in words
    # A completion prompt: its own words, the guessed subject left out.
    ids = tok("The mother tongue of Danielle Darrieux is").input_ids
    assert words_at(tok, ids, relation_positions(ids, tok, marker)) == \
        "The mother tongue of is"
    # Typed in lower case: the guess falls on the word the sentence is about (subject_guess).
    ids = chat_ids(tok, "tell me a joke")
    assert words_at(tok, ids, relation_positions(ids, tok, marker)).strip() == "tell me a"


def test_a_second_key_passes_at_its_threshold_and_zero_means_none():
    mean = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=-1)
    fact = torch.tensor([1.0, 0.0, 0.0])  # cos with `mean`: 0.707
    assert passes(mean, scaled_key(fact, 0.70)[None]).item()
    assert not passes(mean, scaled_key(fact, 0.72)[None]).item()
    assert passes(mean, torch.zeros(1, 3)).item()  # no second key
    assert passes(torch.full((1, 3), float("nan")), scaled_key(fact, 0.99)[None]).item()
    unit = torch.eye(3)
    assert torch.allclose(mean_without(unit, 2), mean[0])
    assert torch.allclose(mean_without(unit[:1], 0), unit[0])  # the only row stays


def test_the_store_keeps_second_keys_through_rekeying_and_reopening(tmp_path):
    cfg = StoreConfig(d_k=4, value_shape=(2,), initial_capacity=2)
    store = ExpertStore.open(tmp_path, cfg)
    keys = np.eye(4, dtype=np.float32)[:3]
    second = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = store.add(keys, np.ones((3, 2), np.float32), 5, second)  # grows past capacity 2
    plain = store.add(keys[:1], np.ones((1, 2), np.float32), 6)
    store.write_keys(ids[:1], 2 * keys[:1])  # a gate moved: the second key stays
    follower = ExpertStore.open(tmp_path)  # the engine's handle, replaying the WAL
    for handle in (store, follower):
        assert np.array_equal(handle.read_relations(ids), second)
        assert not handle.read_relations(plain).any()
    store.close()
    assert np.array_equal(ExpertStore.open(tmp_path).read_relations(ids), second)


def test_the_store_keeps_each_experts_relation_map_through_rekeying_and_reopening(tmp_path):
    cfg = StoreConfig(d_k=4, value_shape=(2,), initial_capacity=2)
    store = ExpertStore.open(tmp_path, cfg)
    keys, values = np.eye(4, dtype=np.float32)[:3], np.ones((3, 2), np.float32)
    ids = store.add(keys, values, 5, keys, np.array([1, 0, 1]))
    plain = store.add(keys[:1], values[:1], 6, keys[:1])  # the first map when none is given
    store.write_keys(ids, 2 * keys)  # a gate moved: the map stays
    follower = ExpertStore.open(tmp_path)
    for handle in (store, follower):
        assert handle.read_relation_maps(ids).tolist() == [1, 0, 1]
        assert handle.read_relation_maps(plain).tolist() == [0]
    store.free(ids[:1])
    store.close()
    reopened = ExpertStore.open(tmp_path)
    assert reopened.read_relation_maps(ids[1:]).tolist() == [0, 1]
    with pytest.raises(ValueError, match="relation maps"):
        reopened.add(keys, values, 7, keys, np.array([1]))
    with pytest.raises(ValueError, match="0 to 255"):
        reopened.add(keys[:1], values[:1], 7, keys[:1], np.array([-1]))
    # A write record from before the completion map carries no maps: the chat map.
    old = reopened.add(keys[:1], values[:1], 8, keys[:1], np.array([1]))
    reopened._commit({"op": np.array("write"), "ids": old, "keys": keys[:1], "values": values[:1],
                      "owners": np.array([8]), "relations": keys[:1],
                      "high_water": np.array(reopened.high_water)})
    assert ExpertStore.open(tmp_path).read_relation_maps(old).tolist() == [0]
    reopened.free(old)
    reopened.close()
    (tmp_path / "relation_maps.u8").unlink()  # a store written before the completion map
    older = ExpertStore.open(tmp_path)
    assert len(older) == 3 and not older.read_relation_maps(older.allocated_ids()).any()


def test_the_layer_compares_each_second_key_through_the_map_it_was_taken_through(tmp_path):
    """Two experts keyed alike, one through each map: a request whose relation mean matches
    the key through the completion map passes the expert keyed through it only."""
    from model.memory_layer import MemoryLayer
    from model.router import CHAT_MAP, COMPLETION_MAP, Router

    d = 4
    swap = torch.eye(d)[[1, 0, 3, 2]]  # the completion map: far from the chat map (identity)
    router = Router(torch.zeros(d), torch.eye(d), torch.eye(d), swap)
    store = ExpertStore.open(tmp_path, StoreConfig(d_k=d, value_shape=(d,), initial_capacity=4))
    h = torch.tensor([[1.0, 0.2, 0.0, 0.0], [0.8, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 1.0]])
    request_mean = torch.nn.functional.normalize(h[:2], dim=-1).sum(0)
    key = scaled_key(router.relation_view(request_mean[None], [COMPLETION_MAP])[0], 0.9)
    ids = store.add(np.eye(d, dtype=np.float32)[:2], np.ones((2, d), np.float32), [1, 2],
                    np.stack([key.numpy()] * 2), np.array([COMPLETION_MAP, CHAT_MAP]))
    layer = MemoryLayer(MemoryConfig(d_k=d), router, store)
    rows, kept = layer.second_keys(h, np.array([2, 2]), ids, [RequestWords(
        0, 3, total=2, rows=np.array([0, 1]), positions=np.array([0, 1]))])
    assert kept.tolist() == [ids[0]] and rows.tolist() == [2]


def test_a_store_with_completion_map_keys_refuses_a_router_without_that_map(tmp_path):
    from model.memory_runtime import load_memory, open_store
    from model.router import COMPLETION_MAP, Router

    d, cfg = 4, MemoryConfig(d_k=4)
    router = Router(torch.zeros(8), torch.eye(d, 8), torch.eye(d))
    router.with_relation(torch.eye(d), torch.eye(d)).save(tmp_path / "both", {})
    router.save(tmp_path / "chat-only", {})
    store = open_store(tmp_path / "store", cfg, 8)
    store.add(np.eye(d, dtype=np.float32)[:1], np.ones((1, 8), np.float32), 1,
              np.ones((1, d), np.float32), np.array([COMPLETION_MAP]))
    store.close()
    assert load_memory(tmp_path / "store", tmp_path / "both", cfg, 8).router.completion_relation \
        is not None
    with pytest.raises(ValueError, match="router it was made with"):
        load_memory(tmp_path / "store", tmp_path / "chat-only", cfg, 8)


def test_a_store_written_before_second_keys_opens_with_none(tmp_path):
    cfg = StoreConfig(d_k=4, value_shape=(2,), initial_capacity=4)
    store = ExpertStore.open(tmp_path, cfg)
    ids = store.add(np.eye(4, dtype=np.float32)[:2], np.ones((2, 2), np.float32), 1)
    store.close()
    (tmp_path / "relations.f32").unlink()
    reopened = ExpertStore.open(tmp_path)
    assert len(reopened) == 2 and not reopened.read_relations(ids).any()


def test_the_layer_silences_an_expert_whose_request_asks_another_relation(
        reference, router_dir, tmp_path):
    """Keyed on the subject's last token, the expert fires on any question about the
    subject; with the fact's second key it adds its value only to its own question (and to
    a request whose relation words match), and it still fires without request words."""
    from model.memory_runtime import load_memory

    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    memory = load_memory(tmp_path / "store", router_dir, MemoryConfig(), reference.d_model,
                         turn_marker=marker)
    memory.record_fired = True

    def encoded(question):
        ids = chat_ids(tok, question)
        h, _ = reference.lower(torch.tensor([ids]))
        locus = len(ids) - 1 - ids[::-1].index(tok(" Zephyr", add_special_tokens=False)
                                               .input_ids[-1])
        return ids, h[0], locus, np.array(relation_positions(ids, tok, marker))

    own_ids, own_h, own_at, own_rel = encoded("Who is the chief engineer of Project Zephyr?")
    unit = torch.nn.functional.normalize(memory.router(own_h), dim=-1).detach()
    mean = mean_without(unit[own_rel], list(own_rel).index(own_at) if own_at in own_rel else None)
    relation = scaled_key(memory.router.relation_view(mean),
                          MemoryConfig().relation_gate("chat", memory.router.map_name(0)))
    key = unit[own_at][None].numpy()
    expert = memory.store.add(key, np.random.default_rng(0).standard_normal(
        (1, reference.d_model)).astype(np.float32), 1, relation[None].numpy())[0]

    def fires(ids, h, rel, words=True, **known) -> bool:
        if words:
            memory.set_words([RequestWords(0, len(ids), total=len(rel), rows=rel,
                                           positions=rel, **known)])
        memory(h)
        memory.take_units()
        return expert in memory.take_fired()[1].tolist()

    other = encoded("What is the budget of Project Zephyr?")
    rephrased = encoded("Who is the lead engineer on Project Zephyr?")
    assert fires(own_ids, own_h, own_rel)
    assert fires(*rephrased[:2], rephrased[3])
    assert fires(*other[:2], other[3], words=False)  # the subject key alone fires here
    assert not fires(*other[:2], other[3])

    # The same request's words known from before (a decode step, or a prompt served from
    # the prefix cache): the sum decides, with no relation word computed in this call.
    ids, h, _, rel = other
    memory.set_words([RequestWords(0, len(ids), total=len(rel), rows=rel, positions=rel)])
    memory(h)
    units = memory.take_units()[0]
    memory.take_fired()
    assert len(units) == len(rel)
    assert not fires(ids, h, rel, known=unit_sum(units))
    # A prefill split in two: its first part does not know the words yet (the subject key
    # alone decides there), the part that completes them does.
    half = len(rel) // 2
    memory.set_words([RequestWords(0, len(ids), total=len(rel), rows=rel[:half],
                                   positions=rel[:half])])
    memory(h)
    earlier = memory.take_units()[0]
    assert expert in memory.take_fired()[1].tolist() and len(earlier) == half
    memory.set_words([RequestWords(0, len(ids), total=len(rel), rows=rel[half:],
                                   positions=rel[half:], earlier=earlier)])
    memory(h)
    assert len(memory.take_units()[0]) == len(rel)
    assert expert not in memory.take_fired()[1].tolist()
    assert fires(ids, h, rel, words=False)


def test_the_words_digest_names_the_prompt_through_its_relation_words():
    a = words_digest([5, 6, 7, 8, 9], [1, 2])
    assert a == words_digest([5, 6, 7, 0, 0], [1, 2])  # tokens after the words do not count
    assert a != words_digest([5, 6, 4, 8, 9], [1, 2]) != words_digest([5, 6, 7, 8, 9], [1])
    assert words_digest([5, 6], []) == ""
