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
