"""The engine's per-request record of fired facts (model/fired_log.py): what it may name, and
when it must send the server back to recomputing. Served end to end in test_parity and
tests/server/test_chunked_prefill_scope.py."""

from __future__ import annotations

from model.fired_log import FiredLog

PROMPT, TURN = 40, 25  # prompt length, and where its last user turn starts


def test_a_request_computed_from_position_0_is_named_from_the_engine_alone():
    log = FiredLog()
    log.step("r", 0, PROMPT, TURN, PROMPT)  # the prefill
    log.add("r", [7, 7, 9], [30, 31, 39])
    for position in range(PROMPT, PROMPT + 4):  # four decode steps
        log.step("r", position, 1, TURN, PROMPT)
    log.add("r", [11], [42])
    assert log.take("r") == {"owners": [7, 9, 11], "prompt_cached": False,
                             "incomplete": False}
    assert log.take("r") is None  # taken once


def test_a_token_forwarded_after_the_answer_ended_is_not_counted():
    """A stop string is found in the API process while one more step runs."""
    log = FiredLog()
    log.step("r", 0, PROMPT, TURN, PROMPT)
    log.add("r", [7, 8], [30, 45])
    log.add("r", [7], [46])
    assert log.take("r", before=45)["owners"] == [7]


def test_prompt_tokens_of_the_turn_served_by_the_prefix_cache_are_flagged():
    log = FiredLog()
    log.step("before-turn", TURN - 9, PROMPT - TURN + 9, TURN, PROMPT)  # cache ended early
    log.step("into-turn", TURN + 5, PROMPT - TURN - 5, TURN, PROMPT)
    assert not log.take("before-turn")["prompt_cached"]
    assert log.take("into-turn")["prompt_cached"]


def test_a_resumed_request_that_jumps_over_tokens_is_flagged():
    """Preempted, then resumed past blocks another request computed meanwhile."""
    log = FiredLog()
    log.step("prompt", 0, 16, TURN, PROMPT)  # a first chunk; preempted after it
    log.step("prompt", 32, PROMPT - 32, TURN, PROMPT)
    log.step("output", 0, PROMPT, TURN, PROMPT)
    log.step("output", PROMPT + 10, 1, TURN, PROMPT)
    assert log.take("prompt")["prompt_cached"]
    assert log.take("output")["incomplete"]


def test_a_record_dropped_while_its_request_runs_comes_back_flagged():
    log = FiredLog(capacity=2)
    log.step("old", 0, PROMPT, TURN, PROMPT)
    log.add("old", [7], [30])
    log.step("b", 0, 8, 0, 8)
    log.step("c", 0, 8, 0, 8)  # "old" is dropped here
    log.step("old", PROMPT + 3, 1, TURN, PROMPT)  # its fourth decode step
    record = log.take("old")
    assert record["owners"] == [] and record["incomplete"] and record["prompt_cached"]


def test_a_step_not_told_apart_by_request_marks_every_record():
    log = FiredLog()
    log.step("open", 0, PROMPT, TURN, PROMPT)
    log.lose_step(["new"])
    assert log.take("open")["incomplete"] and log.take("new")["incomplete"]


def test_a_prompt_the_prefix_cache_served_takes_the_firings_an_earlier_request_computed():
    """The same prompt (same cache key: salt and tokens) asked again: the cache serves its
    blocks, and the firings computed with them come from the first request's record."""
    log = FiredLog()
    log.step("first", 0, PROMPT, TURN, PROMPT, "key-a")
    log.add("first", [7, 9], [30, 38])
    log.keep_prompt("first", "key-a", PROMPT)
    log.step("first", PROMPT, 1, TURN, PROMPT, "key-a")
    log.add("first", [11], [PROMPT])  # fired in the output: not the prompt's
    log.keep_prompt("first", "key-a", PROMPT)
    log.step("again", 32, PROMPT - 32, TURN, PROMPT, "key-a")  # blocks below 32 cached
    log.add("again", [9], [38])
    assert log.take("again") == {"owners": [7, 9], "prompt_cached": False,
                                 "incomplete": False}


def test_a_prompt_with_another_cache_key_or_never_computed_whole_is_still_flagged():
    log = FiredLog()
    log.step("first", 0, PROMPT, TURN, PROMPT, "key-a")
    log.keep_prompt("first", "key-a", PROMPT)
    log.step("other-salt", 32, PROMPT - 32, TURN, PROMPT, "key-b")
    log.keep_prompt("other-salt", "key-b", PROMPT)  # its own prompt was not all seen
    log.step("then", 32, PROMPT - 32, TURN, PROMPT, "key-b")
    assert log.take("other-salt")["prompt_cached"] and log.take("then")["prompt_cached"]
    log.step("chained", 32, PROMPT - 32, TURN, PROMPT, "key-a")
    log.keep_prompt("chained", "key-a", PROMPT)  # filled from key-a: complete, kept again
    assert not log.take("chained")["prompt_cached"]


def test_a_prompt_is_kept_only_once_all_its_chunks_are_in_and_never_when_flagged():
    log = FiredLog()
    log.step("chunked", 0, 16, TURN, PROMPT, "key-a")  # chunked prefill: first 16 tokens
    log.keep_prompt("chunked", "key-a", PROMPT)
    log.step("early", 32, PROMPT - 32, TURN, PROMPT, "key-a")
    assert log.take("early")["prompt_cached"]  # nothing kept from a partial prompt
    log.step("chunked", 16, PROMPT - 16, TURN, PROMPT, "key-a")
    log.add("chunked", [7], [30])
    log.keep_prompt("chunked", "key-a", PROMPT)
    log.step("open", 0, PROMPT, TURN, PROMPT, "key-b")
    log.lose_step([])  # "open" may now miss firings: not kept
    log.keep_prompt("open", "key-b", PROMPT)
    log.step("late", 32, PROMPT - 32, TURN, PROMPT, "key-a")
    log.step("after-lost", 32, PROMPT - 32, TURN, PROMPT, "key-b")
    late = log.take("late")
    assert late["owners"] == [7] and not late["prompt_cached"]
    assert log.take("after-lost")["prompt_cached"]
