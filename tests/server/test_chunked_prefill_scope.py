"""A fact asked earlier in a conversation leaves later questions alone also when the engine
prefills the conversation in chunks (chunked prefill: a step of 16 prompt tokens here), so
that one step computes an earlier turn without the turn being answered.

The shared server (tests/conftest.py) prefills these short prompts in one step; this one
splits every prompt longer than 16 tokens, as a busy server splits long ones.
"""

from __future__ import annotations

import httpx
import pytest

from client.launcher import ServerProcess
from tests.server.test_facts_api import (
    CHAT_FACTS,
    UNRELATED_QUESTIONS,
    after_fact,
    chat,
    chat_turns,
    wait_for_job,
)

pytestmark = pytest.mark.slow

KEY = "chunked-prefill-admin-key"
STEP_TOKENS = 16


@pytest.fixture(scope="module")
def chunking_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("chunked")
    proc = ServerProcess(workdir / "server.log", env={
        "MOME_ADMIN_KEY": KEY, "MOME_STORE_DIR": str(workdir / "store"),
        "MOME_MAX_MODEL_LEN": "512", "MOME_MAX_NUM_SEQS": "8",
        "MOME_MAX_NUM_BATCHED_TOKENS": str(STEP_TOKENS)}).start()
    yield proc
    proc.stop()


def test_history_split_from_the_last_turn_does_not_fire(chunking_server):
    question, answer = CHAT_FACTS[0]
    conversations = [after_fact(question, answer, later) for later in UNRELATED_QUESTIONS]
    base = [chat_turns(chunking_server, c) for c in conversations]
    with httpx.Client(base_url=chunking_server.url, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as admin:
        accepted = admin.post("/v1/facts", json={"facts": [{"question": question,
                                                             "answer": answer}]})
        assert accepted.status_code == 202, accepted.text
        job = wait_for_job(admin, accepted.json()["job_id"])
    assert job["memorized"] == 1, job
    # Asked alone (also split into chunks: its turn starts in the first one) it answers.
    assert chat(chunking_server, question) == answer
    # Every conversation is longer than a step, and its last turn starts after the first.
    for conversation, before in zip(conversations, base):
        assert chat_turns(chunking_server, conversation) == before, conversation[-1]
    # `mome_facts` comes from the engine's record of each split prefill (model/fired_log.py):
    # the fact alone, nothing for the later questions.
    fact_id = accepted.json()["fact_ids"][0]
    assert facts_named(chunking_server, [{"role": "user", "content": question}]) == [fact_id]
    for conversation in conversations:
        assert facts_named(chunking_server, conversation) == [], conversation[-1]
    metrics = httpx.get(f"{chunking_server.url}/metrics").text
    assert 'mome_provenance_total{source="engine"}' in metrics
    assert 'source="recomputed"' not in metrics and 'source="prompt_recomputed"' not in metrics


def facts_named(server, messages: list[dict]) -> list[str]:
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 24})
    return reply.json()["mome_facts"]
