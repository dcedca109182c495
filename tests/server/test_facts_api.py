"""Memory tuning end to end on the real server: post facts, get them answered exactly, leave
everything else unchanged, delete, restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from client.launcher import ServerProcess

pytestmark = pytest.mark.slow

ADMIN_KEY = "test-admin-key"  # the shared server's (tests/conftest.py)
DATA = Path(__file__).resolve().parents[1] / "data" / "counterfact-slice.jsonl"
N_COUNTERFACT = 20
CHAT_FACTS = [
    ("Who is the chief engineer of Project Zephyr?",
     "The chief engineer of Project Zephyr is Ingrid Albescu."),
    ("What is the name of the cafe on Quillon Street?", "It is called The Brass Kettle."),
    ("When does the Marlowe Library open on Sundays?", "It opens at 11 am on Sundays."),
    ("Which river flows through the town of Ostravel?", "The Vesna river flows through Ostravel."),
    ("What is the access code for the Delta lab?", "The access code is 4471."),
]


def counterfact_rows() -> list[dict]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:N_COUNTERFACT]]
    assert len(rows) == N_COUNTERFACT
    return rows


@pytest.fixture(scope="module")
def facts_server(server) -> ServerProcess:
    # The session's one server: two vLLM engines at once would share this machine's cores.
    return server


@pytest.fixture(scope="module")
def admin(facts_server):
    with httpx.Client(base_url=facts_server.url, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(server, prompt: str, max_tokens: int = 16) -> str:
    client = _client(server)
    model = client.models.list().data[0].id
    return client.completions.create(model=model, prompt=prompt, temperature=0,
                                     max_tokens=max_tokens).choices[0].text


def chat(server, question: str, max_tokens: int = 40) -> str:
    return chat_turns(server, [{"role": "user", "content": question}], max_tokens)


def chat_turns(server, messages: list[dict], max_tokens: int = 40) -> str:
    client = _client(server)
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens,
        messages=messages).choices[0].message.content


UNRELATED_QUESTIONS = ["What is the capital of France?", "Tell me a joke."]
# Other questions about two chat facts' subjects. Without second keys (model/relation_key.py)
# the facts' experts fired on the first and third and changed their answers (measured with
# MOME_MEMORY_RELATION_GATE_CHAT=0); the fourth fires and changes with or without them.
OTHER_RELATION = ["What is the budget of Project Zephyr?", "When did Project Zephyr start?",
                  "Who runs the Delta lab?", "Where is the Delta lab?"]


def after_fact(question: str, answer: str, later: str) -> list[dict]:
    """A conversation in which a memorized question was asked and answered before `later`."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
            {"role": "user", "content": later}]


def starts_with(text: str, answer: str) -> bool:
    return " ".join(text.split()).startswith(" ".join(answer.split()))


def wait_for_job(admin, job_id: str, timeout: float = 1200) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = admin.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "done":
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} not done after {timeout}s")


@pytest.fixture(scope="module")
def memorized(facts_server, admin):
    """Record base outputs, then post and memorize 20 CounterFact and 5 chat facts."""
    rows = counterfact_rows()
    base = {
        "prompt": {r["prompt"]: complete(facts_server, r["prompt"]) for r in rows},
        "locality": {r["locality_prompt"]: complete(facts_server, r["locality_prompt"])
                     for r in rows},
        "chat": {q: chat(facts_server, q) for q, _ in CHAT_FACTS},
        "other_relation": {q: chat(facts_server, q) for q in OTHER_RELATION},
        "later": {(q, later): chat_turns(facts_server, after_fact(q, a, later))
                  for q, a in CHAT_FACTS[:2] for later in UNRELATED_QUESTIONS},
    }
    facts = [{"prompt": r["prompt"], "completion": r["target_new"], "subject": r["subject"]}
             for r in rows]
    facts += [{"question": q, "answer": a} for q, a in CHAT_FACTS]
    response = admin.post("/v1/facts", json={"facts": facts})
    assert response.status_code == 202, response.text
    accepted = response.json()
    job = wait_for_job(admin, accepted["job_id"])
    return {"rows": rows, "base": base, "job": job, "fact_ids": accepted["fact_ids"]}


def test_job_memorizes_every_fact(memorized, admin):
    job = memorized["job"]
    assert (job["total"], job["memorized"], job["failed"]) == (25, 25, 0)
    listed = admin.get("/v1/facts").json()["data"]
    assert {f["id"] for f in listed} >= set(memorized["fact_ids"])
    one = admin.get(f"/v1/facts/{memorized['fact_ids'][0]}").json()
    assert one["status"] == "memorized" and one["experts"] and one["steps"] > 0
    assert one["loss"] is not None and one["loss"] < 1.0


def test_completions_answer_memorized_facts_exactly(memorized, facts_server):
    for row in memorized["rows"]:
        assert starts_with(complete(facts_server, row["prompt"]), row["target_new"]), row


def test_chat_answers_memorized_facts_exactly(memorized, facts_server):
    for question, answer in CHAT_FACTS:
        assert chat(facts_server, question) == answer


def test_a_fact_asked_earlier_in_a_conversation_leaves_later_questions_alone(
        memorized, facts_server):
    """Experts fire in the turn being answered only (model/turn_scope.py). Each fact is
    first asked alone, so its KV (computed with its expert firing) sits in the prefix cache
    when the longer conversation comes: the cache salt must keep it from being reused."""
    for (question, later), base in memorized["base"]["later"].items():
        answer = dict(CHAT_FACTS)[question]
        assert chat(facts_server, question) == answer
        assert chat_turns(facts_server, after_fact(question, answer, later)) == base, later


def test_a_fact_asked_after_an_unrelated_exchange_is_answered(memorized, facts_server):
    """Measured at 0.85 on zsRE (reports/METHODS.md): a floor, not every fact."""
    outputs = {}
    for question, _ in CHAT_FACTS:
        messages = [{"role": "user", "content": UNRELATED_QUESTIONS[0]},
                    {"role": "assistant", "content": "The capital of France is Paris."},
                    {"role": "user", "content": question}]
        outputs[question] = chat_turns(facts_server, messages)
    answered = sum(outputs[q] == a for q, a in CHAT_FACTS)
    assert answered >= len(CHAT_FACTS) - 2, outputs


def test_another_question_about_a_memorized_subject_keeps_its_answer(memorized, facts_server):
    kept = [q for q, base in memorized["base"]["other_relation"].items()
            if chat(facts_server, q) == base]
    assert len(kept) >= 3, kept


def test_locality_prompts_unchanged(memorized, facts_server):
    unchanged = sum(complete(facts_server, p) == out
                    for p, out in memorized["base"]["locality"].items())
    assert unchanged >= 0.95 * len(memorized["base"]["locality"])


def test_provenance_names_the_fact(memorized, facts_server):
    client = _client(facts_server)
    model = client.models.list().data[0].id
    row = memorized["rows"][0]
    response = httpx.post(f"{facts_server.url}/v1/completions", json={
        "model": model, "prompt": row["prompt"], "temperature": 0, "max_tokens": 4}).json()
    assert memorized["fact_ids"][0] in response["mome_facts"]
    unrelated = httpx.post(f"{facts_server.url}/v1/completions", json={
        "model": model, "prompt": "Bananas are", "temperature": 0, "max_tokens": 4}).json()
    assert unrelated["mome_facts"] == []


def test_admin_api_needs_the_key(facts_server):
    assert httpx.get(f"{facts_server.url}/v1/facts").status_code == 401
    wrong = httpx.get(f"{facts_server.url}/v1/facts", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("fact, needle", [
    ({"question": "Who?", "answer": "  "}, "answer"),
    ({"prompt": "The sky is", "completion": ""}, "completion"),
    ({"prompt": "x", "completion": "y", "question": "z"}, "not both"),
    ({"prompt": 5, "completion": "y"}, "prompt"),
    ({"prompt": "x " * 3000, "completion": "y"}, "limit"),
    ({"prompt": "The sky is", "completion": "blue", "subject": "grass"}, "subject"),
    ({"answer": "orphan"}, "neither"),
    # Nothing to key the fact on: refused at admission, not as a failed batch later.
    ({"prompt": "<|im_end|>", "completion": "y"}, "content tokens"),
])
def test_bad_facts_are_422_and_nothing_is_kept(admin, fact, needle):
    before = len(admin.get("/v1/facts").json()["data"])
    good = {"prompt": "The capital of Freedonia is", "completion": "Fredville"}
    response = admin.post("/v1/facts", json={"facts": [good, fact]})
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]["message"]
    assert len(admin.get("/v1/facts").json()["data"]) == before


def test_unknown_ids_are_404(admin):
    assert admin.get("/v1/facts/fact-999999").status_code == 404
    assert admin.get("/v1/facts/bogus").status_code == 404
    assert admin.get("/v1/jobs/job-nope").status_code == 404
    assert admin.delete("/v1/facts/fact-999999").status_code == 404


def test_delete_restores_base_output(memorized, facts_server, admin):
    row = memorized["rows"][1]
    fact_id = memorized["fact_ids"][1]
    assert admin.delete(f"/v1/facts/{fact_id}").status_code == 204
    assert admin.get(f"/v1/facts/{fact_id}").status_code == 404
    assert complete(facts_server, row["prompt"]) == memorized["base"]["prompt"][row["prompt"]]


def test_restart_keeps_everything_memorized(memorized, facts_server):
    facts_server.stop()
    facts_server.start()
    deleted = memorized["rows"][1]["prompt"]
    for row in memorized["rows"]:
        if row["prompt"] != deleted:
            assert starts_with(complete(facts_server, row["prompt"]), row["target_new"]), row
    for question, answer in CHAT_FACTS:
        assert chat(facts_server, question) == answer


def test_a_memorized_fact_whose_experts_are_gone_is_memorized_again(memorized, facts_server,
                                                                     admin):
    """A crash between setting a replaced fact's experts aside and finishing its replacement
    leaves it memorized with no experts: the worker's recovery trains it again."""
    from expert_store.store import ExpertStore

    row, fact_id = memorized["rows"][2], memorized["fact_ids"][2]
    before = admin.get(f"/v1/facts/{fact_id}").json()["updated_at"]
    facts_server.stop()
    store = ExpertStore.open(facts_server.env["MOME_STORE_DIR"])
    assert store.free(store.ids_of_owner(int(fact_id.split("-")[1]))) == 1
    del store
    facts_server.start()
    # Recovery runs in the worker's thread after start-up: until it requeues the fact, the
    # record still reads "memorized" from before; only a later update is the new one.
    deadline = time.monotonic() + 600
    while True:
        fact = admin.get(f"/v1/facts/{fact_id}").json()
        if fact["status"] == "memorized" and fact["updated_at"] > before:
            break
        assert time.monotonic() < deadline, "not memorized again"
        time.sleep(1)
    assert starts_with(complete(facts_server, row["prompt"]), row["target_new"])


def _rows_with_prompt(prompt: str) -> list[dict]:
    """CounterFact asks some prompts again with other targets (twin cities, five for Tirana)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return [r for r in rows if r["prompt"] == prompt]


def test_same_prompt_again_replaces_the_old_fact(facts_server, admin):
    first, second = _rows_with_prompt("The twin city of Tirana is")[:2]
    ids = []
    for row in (first, second):  # one after another: the second finds the first stored
        fact = {"prompt": row["prompt"], "completion": row["target_new"],
                "subject": row["subject"]}
        accepted = admin.post("/v1/facts", json={"facts": [fact]}).json()
        assert wait_for_job(admin, accepted["job_id"])["memorized"] == 1
        ids += accepted["fact_ids"]
    old, new = (admin.get(f"/v1/facts/{i}").json() for i in ids)
    assert old["status"] == "superseded" and old["replaced_by"] == ids[1] and not old["experts"]
    # Trained like any new fact: not retrained against the old expert for round after round.
    assert new["status"] == "memorized" and new["steps"] <= 60
    assert starts_with(complete(facts_server, second["prompt"]), second["target_new"])

    first, second = _rows_with_prompt("What is the twin city of Vienna? It is")[:2]
    both = [{"prompt": r["prompt"], "completion": r["target_new"]} for r in (first, second)]
    accepted = admin.post("/v1/facts", json={"facts": both}).json()  # in one batch
    job = wait_for_job(admin, accepted["job_id"])
    assert (job["memorized"], job["superseded"], job["failed"]) == (1, 1, 0)
    assert admin.get(f"/v1/facts/{accepted['fact_ids'][0]}").json()["replaced_by"] == \
        accepted["fact_ids"][1]
    assert starts_with(complete(facts_server, second["prompt"]), second["target_new"])


def test_cli_facts_add_list_rm(facts_server, tmp_path):
    import subprocess
    import sys

    facts_file = tmp_path / "facts.jsonl"
    facts_file.write_text(json.dumps({"question": "What is the name of the ferry to Ulmo "
                                      "island?", "answer": "The ferry is called Gannet."}) + "\n")
    env = {"MOME_ADMIN_KEY": ADMIN_KEY, "MOME_URL": facts_server.url,
           "PATH": str(Path(sys.executable).parent)}

    def mome(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "client.cli", *args], env=env,
                              capture_output=True, text=True, timeout=600)

    added = mome("facts", "add", str(facts_file))
    assert added.returncode == 0, added.stderr
    assert "memorized 1/1" in added.stdout and "1/1" in added.stderr  # progress bar
    listed = mome("facts", "list", "--status", "memorized")
    line = next(x for x in listed.stdout.splitlines() if "Ulmo" in x)
    fact_id = line.split("\t")[0]
    assert chat(facts_server, "What is the name of the ferry to Ulmo island?") == \
        "The ferry is called Gannet."
    removed = mome("facts", "rm", fact_id)
    assert removed.returncode == 0 and f"deleted {fact_id}" in removed.stdout
    assert fact_id not in mome("facts", "list").stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    refused = mome("facts", "add", str(bad))
    assert refused.returncode == 1 and "answer" in refused.stderr
