"""Experts fire in the turn being answered only (model/turn_scope.py)."""

from __future__ import annotations

import torch

from model.turn_scope import (
    after_turn_starts,
    alone_prompt,
    in_scope,
    in_scope_rows,
    scope_start,
    user_turn_marker,
)


def conversation(tokenizer, *turns: str) -> list[int]:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                         add_generation_prompt=True)


def scoped_text(tokenizer, ids: list[int], mask: torch.Tensor | None) -> str:
    return tokenizer.decode([t for t, keep in zip(ids, mask.tolist()) if keep])


def test_only_the_last_user_turn_is_in_scope(reference):
    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    assert tok.convert_ids_to_tokens(list(marker)) == ["<|im_start|>", "user"]
    ids = conversation(tok, "Who founded Acme?", "Jane Roe.", "Tell me a joke.")
    mask = in_scope_rows(torch.tensor(ids), marker)[0]
    text = scoped_text(tok, ids, mask)
    assert "Tell me a joke." in text and "Acme" not in text and "Jane" not in text
    assert "system" not in text  # the system turn is history too
    assert ids[scope_start(ids, marker)] == marker[0] and mask[scope_start(ids, marker)]


def test_completion_prompts_and_decode_steps_are_wholly_in_scope(reference):
    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    assert in_scope(torch.tensor(tok("The capital of France is").input_ids), [0], marker) is None
    assert scope_start(tok("The capital of France is").input_ids, marker) == 0


def test_each_chunk_of_a_flat_batch_is_scoped_on_its_own(reference):
    """As vLLM batches them: a two-turn prefill, a decode token, a chunk whose turn started
    in a cached prefix (no marker in it), and a single-turn prefill."""
    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    two_turns = conversation(tok, "Who founded Acme?", "Jane Roe.", "Tell me a joke.")
    tail = tok("the rest of a long question", add_special_tokens=False).input_ids
    one_turn = conversation(tok, "Where is Zorb?")
    chunks = [two_turns, [tok.eos_token_id], tail, one_turn]
    starts = [0]
    for chunk in chunks[:-1]:
        starts.append(starts[-1] + len(chunk))
    flat = torch.tensor([t for chunk in chunks for t in chunk])
    mask = in_scope(flat, starts, marker)
    parts = [mask[a:a + len(c)] for a, c in zip(starts, chunks)]
    assert not parts[0][:scope_start(two_turns, marker)].any()
    assert parts[0][scope_start(two_turns, marker):].all()
    assert parts[1].all() and parts[2].all()
    assert not parts[3][:scope_start(one_turn, marker)].any()
    assert parts[3][scope_start(one_turn, marker):].all()


def test_a_prompt_split_by_chunked_prefill_keeps_its_history_out_of_scope(reference):
    """Chunked prefill may end a step between two turns: the first chunk then holds an
    earlier turn's marker but not the last one, a middle chunk no marker at all. The
    token-id rule would let both fire; the engine's rule, by position against the prompt's
    turn start, keeps every history token out, in whichever chunk it is computed."""
    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    ids = conversation(tok, "Who founded Acme?", "Jane Roe founded it in a small town.",
                       "Tell me a joke.")
    turn = scope_start(ids, marker)
    first_user = scope_start(ids[:turn], marker)
    cuts = [0, first_user + 4, turn - 3, len(ids)]  # history, history, then the last turn
    positions = torch.arange(len(ids))
    chunks = [(torch.tensor(ids[a:b]), positions[a:b]) for a, b in zip(cuts, cuts[1:])]
    for _, chunk_positions in chunks:
        by_position = after_turn_starts(chunk_positions, [0], [turn])
        assert torch.equal(by_position, chunk_positions >= turn)
    # By token ids, the first user turn fires in the first chunk, the whole middle chunk too.
    assert in_scope(chunks[0][0], [0], marker)[first_user:].all()
    assert in_scope(chunks[1][0], [0], marker) is None
    whole = after_turn_starts(positions, [0], [turn])
    assert torch.equal(whole, in_scope_rows(torch.tensor(ids), marker)[0])
    assert after_turn_starts(positions, [0], [0]) is None


def test_tokens_out_of_scope_are_not_searched_and_fire_nothing(reference, router_dir, tmp_path):
    """The layer searches only the tokens that may fire (the search is its main cost with a
    large store), and a history token matching an expert's key exactly still adds nothing."""
    from model.config import MemoryConfig
    from model.memory_runtime import load_memory

    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    memory = load_memory(tmp_path / "store", router_dir, MemoryConfig(), reference.d_model,
                         turn_marker=marker)
    ids = conversation(tok, "Who founded Acme?", "Jane Roe.", "Tell me a joke.")
    h, _ = reference.lower(torch.tensor([ids]))
    h = h[0]
    scope = in_scope_rows(torch.tensor(ids), marker)[0]
    history_at = ids.index(tok(" Acme", add_special_tokens=False).input_ids[-1])
    turn_at = len(ids) - 1 - ids[::-1].index(tok(" joke", add_special_tokens=False).input_ids[0])
    assert not scope[history_at] and scope[turn_at]
    queries = memory.router(h[[history_at, turn_at]]).detach().numpy()
    values = torch.randn(2, reference.d_model).numpy()
    history_id, turn_id = memory.store.add(queries, values, owners=1).tolist()
    searched = []
    search = memory.store.search
    memory.store.search = lambda xq, k: searched.append(len(xq)) or search(xq, k)
    memory.record_fired = True

    delta = memory(h, scope=scope)
    assert searched == [int(scope.sum())]
    fired_rows, fired_ids = memory.take_fired()
    assert (turn_at, turn_id) in zip(fired_rows.tolist(), fired_ids.tolist())
    assert history_at not in fired_rows.tolist() and history_id not in fired_ids.tolist()
    assert delta[~scope].abs().sum() == 0 and delta[turn_at].abs().sum() > 0
    # Nothing in scope: nothing searched, nothing fires.
    assert memory(h, scope=torch.zeros_like(scope)).abs().sum() == 0
    assert searched == [int(scope.sum())] and len(memory.take_fired()[0]) == 0
    # Without a scope every token is searched, and the history token fires too.
    memory(h)
    assert searched[-1] == len(ids) and history_at in memory.take_fired()[0].tolist()


def test_a_turn_after_earlier_ones_is_routed_as_if_asked_alone(reference, router_dir, tmp_path):
    """A history moves the states at a question's words, so a fact's key could miss its own
    question asked later in a conversation. The router reads that turn's prompt tokens as
    if the turn followed the system turn alone; the values still go to the prompt's stream,
    and the tokens outside the turn's words keep their own states: the history (out of scope
    anyway), and the assistant's header and answer after them."""
    from model.config import MemoryConfig
    from model.memory_runtime import load_memory

    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    question = "Who designed the Orvel bridge?"
    ids = conversation(tok, "Tell me a joke.", "Why did the chicken cross the road?", question)
    asked_alone = conversation(tok, question)
    special = set(tok.all_special_ids)
    turn, at = scope_start(ids, marker), scope_start(asked_alone, marker)
    closed = asked_alone.index(tok.convert_tokens_to_ids("<|im_end|>"), at)  # after its words
    view = alone_prompt(ids, marker, special)
    assert view == (asked_alone[:closed], turn, at)
    assert tok.decode(ids[view.turn_start:view.turn_end]).endswith(question)
    assert alone_prompt(asked_alone, marker, special) is None  # its own alone view
    # A conversation that opens with a user turn (no system turn, as a raw prompt may):
    # the turn asked alone is the turn itself.
    bare = ids[ids.index(marker[0], 1):]
    [bare_view] = reference.alone_prompts([bare])
    assert bare_view.at == 0
    [bare_states] = reference.states_alone([bare_view])
    bare_alone, _ = reference.lower(torch.tensor([bare_view.ids]))
    assert torch.allclose(bare_states, bare_alone[0], rtol=1e-4, atol=1e-4)
    assert alone_prompt(tok("The capital of France is").input_ids, marker, special) is None

    batch = torch.tensor([ids])
    h, _ = reference.lower(batch)
    alone, _ = reference.lower(torch.tensor([asked_alone]))
    routed = reference.routed(batch, h)[0]
    in_turn = slice(turn, view.turn_end)
    assert torch.allclose(routed[in_turn], alone[0, at:closed], rtol=1e-4, atol=1e-4)
    assert (h[0, in_turn] - alone[0, at:closed]).abs().max() > 0.1  # the history moved them
    assert torch.equal(routed[:turn], h[0, :turn])
    assert torch.equal(routed[view.turn_end:], h[0, view.turn_end:])  # header, then answer

    # An expert keyed on the question's last word asked alone fires there exactly as alone
    # (cosine 1), and adds its value to the prompt's own stream.
    memory = load_memory(tmp_path / "store", router_dir, MemoryConfig(), reference.d_model,
                         turn_marker=marker)
    word = len(ids) - 1 - ids[::-1].index(tok(" bridge", add_special_tokens=False).input_ids[0])
    key = memory.router(routed[word:word + 1]).detach().numpy()
    plain_cos = float(torch.nn.functional.normalize(memory.router(h[0, word:word + 1]), dim=-1)
                      @ torch.from_numpy(key).T)
    assert plain_cos < 0.999
    value = torch.randn(1, reference.d_model)
    expert = memory.store.add(key, value.numpy(), owners=1).tolist()[0]
    memory.record_fired = True
    delta = memory(h[0], scope=in_scope_rows(batch, marker)[0], routed=routed)
    fired_rows, fired_ids = memory.take_fired()
    assert (word, expert) in zip(fired_rows.tolist(), fired_ids.tolist())
    assert torch.allclose(delta[word], value[0], atol=1e-5)


def test_the_engine_routes_each_chunk_of_a_later_turn_as_if_asked_alone(reference):
    """The serving forward's view of one step's flat batch (model/vllm_model.py): chunked
    prefill and the prefix cache may start or end a request's tokens anywhere in its turn,
    and each row gets the state of its own position asked alone."""
    from types import SimpleNamespace

    from model.vllm_model import MomeLlamaForCausalLM, ScheduledRequest, Step

    tok = reference.tokenizer
    marker = user_turn_marker(tok)
    ids = conversation(tok, "Tell me a joke.", "Why did the chicken cross the road?",
                       "Who designed the Orvel bridge?")
    [alone] = reference.alone_prompts([ids])
    h, _ = reference.lower(torch.tensor([ids]))
    expected = reference.routed(torch.tensor([ids]), h)[0]

    def request(alone_view):
        return ScheduledRequest(None, None, scope_start(ids, marker), len(ids),
                                torch.zeros(0, dtype=torch.long).numpy(), "", alone_view)

    # Three requests in one step: history only (a first chunk), a chunk from the middle of
    # the turn to the prompt's end (a prefix-cache hit), a single-turn prompt (no view).
    mid = alone.turn_start + 3
    spans = [(0, alone.turn_start - 2), (mid, len(ids)), (0, 5)]
    step = Step([request(alone), request(alone), request(None)],
                starts=[0, alone.turn_start - 2, alone.turn_start - 2 + len(ids) - mid],
                first=[a for a, _ in spans], n_tokens=[b - a for a, b in spans], end=0)
    view = MomeLlamaForCausalLM._turn_view(SimpleNamespace(mome_lower=reference), step)
    in_turn = torch.arange(mid, alone.turn_end)
    assert torch.equal(view.rows, step.starts[1] + in_turn - mid)
    assert torch.allclose(view.states, expected[in_turn], atol=1e-5)
