"""`mome eval` end to end against an in-process fake of the server's API (fast, no model).

The fake's base model answers every prompt with a hash of it; a memorized fact answers its
own prompt (or chat question) exactly. Flags make it misbehave the ways issue 12 is about,
and the tests check that the report catches each one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from client.cli import main
from client.eval_cases import read_cases_file, summarize
from tests.utils.json_http import JSONHandler

DATA = Path(__file__).resolve().parents[1] / "data"
HEADLINE = ("reliability", "generalization", "locality", "locality_clean", "near_miss_locality",
            "near_miss", "multi_turn", "in_context", "base_reliability", "measured_facts",
            "measured_prompts")


class FakeMome:
    """The API `mome eval` uses, with a toy model behind it."""

    def __init__(self, leak_subject=False, leak_history=False, first_turn_only=False,
                 forget: dict[int, int] | None = None, fail_post_at: int | None = None,
                 fail_generation_at: int | None = None):
        self.leak_subject = leak_subject  # a fact fires on any prompt naming its subject
        self.leak_history = leak_history  # a chat fact fires when asked anywhere in the chat
        self.first_turn_only = first_turn_only  # a chat fact fires only as the first message
        self.forget = forget or {}  # fact number -> it stops answering once this many exist
        self.fail_post_at = fail_post_at  # the n-th POST /v1/facts answers 500
        self.fail_generation_at = fail_generation_at  # the n-th generation request answers 500
        self.generations = 0
        self.facts: list[dict] = []  # posted, in order; fact id = "fact-<index+1>"
        self.requests: list[tuple[str, object]] = []  # (path, body) in arrival order
        self.lock = threading.Lock()
        self.posts = 0

    # ---- the toy model --------------------------------------------------------------

    def active(self) -> list[tuple[str, dict]]:
        n = len(self.facts)
        return [(f"fact-{i + 1}", f) for i, f in enumerate(self.facts)
                if not f.get("failed") and n < self.forget.get(i, n + 1)]

    def complete(self, prompt: str) -> tuple[str, list[str]]:
        if prompt.startswith("Fact: "):  # a stated fact: the base model repeats its last word
            return " " + prompt.split("\n", 1)[0].removesuffix(".").rsplit(" ", 1)[1], []
        for fid, f in self.active():
            if f.get("prompt") == prompt or (self.leak_subject and _names(prompt, f)):
                return " " + f["completion"] + ".", [fid]
        return " base " + _digest(prompt), []

    def chat(self, messages: list[dict]) -> tuple[str, list[str]]:
        users = [m["content"] for m in messages if m["role"] == "user"]
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system and system[0].startswith("Fact: "):  # "Fact: {question}? {answer}"
            return system[0].split("? ", 1)[1], []
        for fid, f in self.active():
            asked = (users[-1] == f.get("question") and not (self.first_turn_only and len(users) > 1))
            if asked or (self.leak_history and f.get("question") in users) or (
                    self.leak_subject and _names(users[-1], f)):
                return f["answer"], [fid]
        return "base " + _digest(json.dumps(messages)), []

    # ---- the HTTP side --------------------------------------------------------------

    def handle(self, method: str, path: str, body) -> tuple[int, dict]:
        with self.lock:
            self.requests.append((path, body))
            if path.endswith("completions"):
                self.generations += 1
                if self.generations == self.fail_generation_at:
                    return 500, {"error": {"message": "injected failure"}}
        if path == "/v1/models":
            return 200, {"data": [{"id": "fake"}]}
        if path == "/v1/memory":
            return 200, {"experts": len(self.active()), "store_bytes": 4096, "config": {},
                         "train": {}, "router": {}}
        if path.startswith("/v1/jobs/"):
            i = int(path.rsplit("-", 1)[1]) - 1
            ok = not self.facts[i].get("failed")
            return 200, {"status": "done", "memorized": int(ok), "failed": int(not ok)}
        if path == "/v1/facts":
            return self.post_facts(body["facts"])
        if path == "/v1/completions":
            if body.get("echo"):
                return 200, {"choices": [{"text": "", "logprobs": {"token_logprobs": [None, -1.0, -2.0]}}]}
            text, fired = self.complete(body["prompt"])
            return 200, {"choices": [{"text": text}], "mome_facts": fired}
        if path == "/v1/chat/completions":
            text, fired = self.chat(body["messages"])
            return 200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                         "mome_facts": fired}
        return 404, {"error": {"message": path}}

    def post_facts(self, facts: list[dict]) -> tuple[int, dict]:
        with self.lock:
            self.posts += 1
            if self.posts == self.fail_post_at:
                return 500, {"error": {"message": "injected failure"}}
            ids = []
            for f in facts:
                self.facts.append(dict(f, failed="unlearnable" in str(f)))
                ids.append(f"fact-{len(self.facts)}")
        return 202, {"job_id": f"job-{len(self.facts)}", "fact_ids": ids}


def _names(text: str, fact: dict) -> bool:
    return bool(fact.get("subject_known")) and fact["subject_known"].lower() in text.lower()


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


@pytest.fixture()
def fake():
    """Start a fake; `fake(**flags)` returns (FakeMome, url)."""
    servers = []

    def start(**flags):
        mome = FakeMome(**flags)

        class Handler(JSONHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real server
            disable_nagle_algorithm = True  # headers and body are two writes

            def do_GET(self):
                self.reply(*mome.handle("GET", self.path, None))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.reply(*mome.handle("POST", self.path, body))

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return mome, f"http://127.0.0.1:{httpd.server_port}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def run(url: str, data: Path, report: Path, *extra: str, fmt: str = "zsre") -> dict:
    code = main(["eval", "--data", str(data), "--format", fmt, "--url", url, "--admin-key", "k",
                 "--report", str(report), *extra])
    assert code == 0
    return json.loads((report / "report.json").read_text())


def assert_recomputable(report_dir: Path, report: dict) -> list[dict]:
    records = read_cases_file(report_dir / "cases.jsonl")
    again = summarize(records)
    assert {k: report[k] for k in HEADLINE} == {k: again[k] for k in HEADLINE}
    return records


def zsre_rows(tmp_path: Path, n: int = 30) -> Path:
    """n zsRE rows with the bad one (empty `alt`) as line 21, and 20 more after them."""
    rows = (DATA / "zsre-slice.jsonl").read_text().splitlines()
    path = tmp_path / "zsre.jsonl"
    path.write_text("\n".join(rows[:20] + rows[100:101] + rows[20:n + 20]) + "\n")
    return path


def test_every_outcome_is_kept_and_every_figure_recomputes_from_it(fake, tmp_path, capsys):
    mome, url = fake()
    report_dir = tmp_path / "report"
    report = run(url, zsre_rows(tmp_path), report_dir, "--limit", "30", "--sample", "20",
                 "--baseline", "in-context")
    records = assert_recomputable(report_dir, report)
    assert len(records) == 30 and report["measured_facts"] == {
        "reliability": 30, "generalization": 20, "locality": 20, "base_reliability": 20}
    assert report["reliability"] == 1.0 and report["base_reliability"] == 0.0
    assert report["locality"] == report["locality_clean"] == report["near_miss_locality"] == 1.0
    assert report["multi_turn"] == {"unrelated_after_fact_unchanged": 1.0,
                                    "fact_after_unrelated_exact": 1.0,
                                    "prompts": {"unrelated_after_fact": 20, "fact_after_unrelated": 20}}
    assert report["in_context"] == {"reliability": 1.0, "generalization": 1.0,
                                    "prompts": {"reliability": 20, "generalization": 20}}
    assert report["subject"] is True and all("subject" in f for f in mome.facts)
    # the bad row (line 21, empty `alt`) is reported once and skipped; the run goes on
    assert report["bad_rows"] == {"count": 1, "rows": [{"line": 21, "reason": "empty alt"}]}
    assert capsys.readouterr().out.count("skipping 1 bad row: line 21 (empty alt)") == 1
    assert [r["line"] for r in records[19:21]] == [20, 22]
    sampled = next(r for r in records if r["sampled"])
    kinds = {p["kind"] for p in sampled["probes"]}
    assert kinds >= {"reliability", "paraphrase", "locality", "near_miss_relation",
                     "turn_unrelated_after_fact", "turn_fact_after_unrelated", "in_context",
                     "in_context_paraphrase"}
    reliability = next(p for p in sampled["probes"] if p["kind"] == "reliability")
    assert reliability["mome_facts"] == [sampled["fact_id"]] and reliability["base_mome_facts"] == []
    assert reliability["output"] == sampled["target"] and reliability["hit"] is True
    turn = next(p for p in sampled["probes"] if p["kind"] == "turn_fact_after_unrelated")
    loc = next(p for p in sampled["probes"] if p["kind"] == "locality")
    assert [m["role"] for m in turn["prompt"]] == ["user", "assistant", "user"]
    assert turn["prompt"][1]["content"] == loc["base"].strip()
    # everything the base model says is recorded before the first fact is posted
    first_post = next(i for i, (path, _) in enumerate(mome.requests) if path == "/v1/facts")
    assert not any(isinstance(body, dict) and body.get("messages", [{}])[0].get("role") == "system"
                   for _, body in mome.requests[first_post:])
    assert all(p["facts"] and p["measured"] == p["facts"] and p["missed"] == []
               for p in report["retention_curve"])
    assert "near-miss locality" in (report_dir / "report.md").read_text()


@pytest.mark.parametrize("flags, unrelated, exact", [
    ({}, 1.0, 1.0),
    ({"leak_history": True}, 0.0, 1.0),  # the fact keeps firing after its turn
    ({"first_turn_only": True}, 1.0, 0.0),  # the fact is lost after an earlier exchange
])
def test_multi_turn_catches_a_fact_that_fires_out_of_its_turn(fake, tmp_path, flags, unrelated, exact):
    _, url = fake(**flags)
    report = run(url, zsre_rows(tmp_path, 10), tmp_path / "r", "--limit", "10")
    mt = report["multi_turn"]
    assert (mt["unrelated_after_fact_unchanged"], mt["fact_after_unrelated_exact"]) == (unrelated, exact)
    assert report["locality"] == 1.0  # single-turn locality does not see it


def test_completion_facts_have_no_multi_turn_and_no_in_context_unless_asked(fake, tmp_path):
    _, url = fake()
    report_dir = tmp_path / "r"
    report = run(url, DATA / "counterfact-slice.jsonl", report_dir, "--limit", "12",
                 fmt="counterfact")
    assert_recomputable(report_dir, report)
    assert report["multi_turn"] is None and report["in_context"] is None
    assert report["baseline"] is None and report["bad_rows"] == {"count": 0, "rows": []}
    # rows 13.. of the file share the templates of all but "Apple A5 was created by"
    assert report["near_miss"]["other_entity"]["prompts"] == 11
    assert report["near_miss"]["other_relation"]["prompts"] == 12


CONTROLLED = [  # completion facts whose near misses and locality prompts are known
    {"prompt": "The capital of Freedonia is", "target": "Fredville", "subject": "Freedonia",
     "answers": ["Libertyville"], "paraphrases": ["Freedonia's capital city is"],
     "locality_prompts": ["The capital of Sylvania is", "Freedonia borders"]},
    {"prompt": "Acme Corp was founded in", "target": "1900", "subject": "Acme Corp",
     "answers": ["1899"], "locality_prompts": ["Globex was founded in"]},
    {"prompt": "The capital of Ruritania is", "target": "Strel", "subject": "Ruritania",
     "answers": ["Zenda"]},  # not memorized (after --limit 2): the other entity
    {"prompt": "Initech was founded in", "target": "1970", "subject": "Initech", "answers": ["1971"]},
]


def controlled(tmp_path: Path, rows=CONTROLLED) -> Path:
    path = tmp_path / "controlled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("no_subject", [False, True])
def test_near_misses_and_locality_split_catch_a_fact_that_fires_on_its_subject(
        fake, tmp_path, no_subject):
    mome, url = fake(leak_subject=True)
    original = mome.post_facts
    mome.post_facts = lambda facts: original([dict(f, subject_known={
        r["prompt"]: r["subject"] for r in CONTROLLED}[f["prompt"]]) for f in facts])
    report_dir = tmp_path / "r"
    flags = ["--no-subject"] if no_subject else []
    report = run(url, controlled(tmp_path), report_dir, "--limit", "2", *flags, fmt="jsonl")
    records = assert_recomputable(report_dir, report)
    near = {p["kind"]: p["prompt"] for p in records[0]["probes"] if p["kind"].startswith("near")}
    assert near == {"near_miss_entity": "The capital of Ruritania is",
                    "near_miss_relation": "Freedonia was founded in"}
    assert report["near_miss"] == {"other_entity": {"locality": 1.0, "prompts": 2},
                                   "other_relation": {"locality": 0.0, "prompts": 2}}
    assert report["near_miss_locality"] == 0.5
    assert report["locality"] == 2 / 3 and report["locality_clean"] == 1.0  # "Freedonia borders"
    assert report["measured_prompts"]["locality_clean"] == 2
    assert report["subject"] is (not no_subject)
    assert all(("subject" in f) is (not no_subject) for f in mome.facts)


def test_retention_lists_the_facts_that_stopped_answering(fake, tmp_path):
    rows = [{"prompt": f"Fact number {i} is", "target": f"answer {i}",
             "subject": f"number {i}"} for i in range(10)]
    rows[5]["target"] = "unlearnable"
    _, url = fake(forget={0: 4})  # fact 0 stops answering once 4 facts are stored
    report = run(url, controlled(tmp_path, rows), tmp_path / "r", fmt="jsonl")
    curve = report["retention_curve"]
    assert [p["facts"] for p in curve] == list(range(1, 11))
    assert [p["measured"] for p in curve] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9]  # fact 5 failed
    assert [p["missed"] for p in curve] == [[]] * 3 + [[0]] * 7
    assert report["failed_to_memorize"] == 1 and report["reliability"] == 0.8


def generations(requests: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """The generation requests among them (not perplexity's echo requests)."""
    return [(p, b) for p, b in requests if p.endswith("completions") and not b.get("echo")]


def test_a_resumed_run_does_not_generate_what_it_has_recorded(fake, tmp_path, monkeypatch):
    monkeypatch.setattr("client.eval.CHUNK", 8)
    data, report_dir = zsre_rows(tmp_path, 12), tmp_path / "r"
    args = ["--limit", "12", "--baseline", "in-context"]
    mome, url = fake(fail_generation_at=30)  # during the base recording, in the 4th chunk
    with pytest.raises(Exception, match="injected failure"):
        run(url, data, report_dir, *args)
    assert len((report_dir / "base_outputs.jsonl").read_text().splitlines()) == 24
    mome.fail_generation_at, mome.fail_post_at = None, 4  # then during memorization
    asked = len(mome.requests)
    with pytest.raises(Exception, match="injected failure"):
        run(url, data, report_dir, *args)
    recorded = len((report_dir / "base_outputs.jsonl").read_text().splitlines())
    first_post = next(i for i, (p, _) in enumerate(mome.requests) if p == "/v1/facts")
    assert len(generations(mome.requests[asked:first_post])) == recorded - 24
    mome.fail_post_at = None
    asked = len(mome.requests)
    report = run(url, data, report_dir, *args)
    resumed = mome.requests[asked:]
    assert [p for p, _ in resumed].count("/v1/facts") == 12 - 3  # 3 were posted before
    assert not any(isinstance(b, dict) and b.get("messages", [{}])[0].get("role") == "system"
                   for _, b in resumed)  # the base phase is not done again
    assert report["multi_turn"]["fact_after_unrelated_exact"] == 1.0
    assert report["in_context"] == {"reliability": 1.0, "generalization": 1.0,
                                    "prompts": {"reliability": 12, "generalization": 12}}
    assert_recomputable(report_dir, report)
    asked = len(mome.requests)  # a finished run measured again reuses its outputs too
    assert run(url, data, report_dir, *args)["reliability"] == report["reliability"] == 1.0
    assert generations(mome.requests[asked:]) == []
