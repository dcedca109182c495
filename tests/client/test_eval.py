"""`mome eval` on a 30-fact CounterFact slice against the real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.eval import held_out_texts, load_cases, starts_with, superseded

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "data" / "counterfact-slice.jsonl"


def test_load_formats(tmp_path):
    cases, truths = load_cases(str(DATA), "counterfact")
    assert len(cases) == 427 and not cases[0].chat and cases[0].paraphrases and truths
    zsre = tmp_path / "z.jsonl"
    zsre.write_text(json.dumps({"src": "Who founded X?", "alt": "Ann", "rephrase": "X's founder?",
                                "loc": "nq question: who is Y", "loc_ans": "Bob",
                                "subject": "X"}) + "\n")
    (case,), truths = load_cases(str(zsre), "zsre")
    assert case.chat and case.fact() == {"question": "Who founded X?", "answer": "Ann",
                                         "subject": "X"}
    assert truths == ["nq question: who is Y Bob"]
    assert starts_with(" Ann  Smith", "Ann Smith") and not starts_with("Annie", "Bob")


def test_a_prompt_asked_again_supersedes_the_earlier_cases():
    cases, _ = load_cases(str(DATA), "counterfact")
    tirana = [i for i, c in enumerate(cases) if c.prompt == "The twin city of Tirana is"]
    replaced = superseded(cases)
    assert len(tirana) == 5 and set(tirana[:4]) <= replaced and tirana[-1] not in replaced
    assert superseded(cases[:tirana[1]]) & set(tirana) == set()  # before it is asked again


def test_perplexity_texts_are_never_the_memorized_facts_own():
    cases, truths = load_cases(str(DATA), "counterfact")
    assert held_out_texts(cases, truths, 100) == truths[100:300]
    everything = held_out_texts(cases, truths, len(cases))  # no rows left after a full run
    assert len(everything) == 200 and not set(everything) & set(truths)
    assert everything[0].startswith(cases[-1].locality[0])


def test_eval_slice_of_30(server, tmp_path):
    rows = DATA.read_text().splitlines()[300:330]  # rows no other test memorizes
    data = tmp_path / "slice.jsonl"
    data.write_text("\n".join(rows) + "\n" + "\n".join(DATA.read_text().splitlines()[330:380]))
    report_dir = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "eval", "--data", str(data), "--limit", "30",
         "--url", server.url, "--admin-key", "test-admin-key", "--report", str(report_dir),
         "--window", "3", "--sample", "20"],
        capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    for key in ("reliability", "generalization", "locality", "retention_curve",
                "general_ability", "seconds_per_fact", "experts_used", "n_facts", "format",
                "model", "method_config"):
        assert key in report
    assert report["n_facts"] == 30 and report["format"] == "counterfact"
    assert report["posting_window"] == 3 and len(report["retention_curve"]) == 10
    assert report["measured_facts"] == {"reliability": 30, "generalization": 20,
                                        "locality": 20, "base_reliability": 20}
    assert report["reliability"] >= 0.95
    assert report["locality"] >= 0.9
    assert report["base_reliability"] <= 0.2  # the counterfactual targets are not known
    assert [p["facts"] for p in report["retention_curve"]] == list(range(3, 31, 3))
    assert 0.9 < report["general_ability"]["ratio"] < 1.1
    assert report["experts_used"] >= 30
    assert (report_dir / "report.md").read_text().startswith("# mome eval")
    assert (report_dir / "retention.png").stat().st_size > 1000
    # issue 12's instrument: every figure recomputes from the per-prompt outcomes
    from client.eval_cases import read_cases_file, summarize

    again = summarize(read_cases_file(report_dir / "cases.jsonl"))
    for key in ("reliability", "generalization", "locality", "locality_clean",
                "near_miss_locality", "base_reliability", "measured_facts"):
        assert report[key] == again[key]
    assert report["subject"] is True and report["multi_turn"] is None
    assert report["near_miss"]["other_relation"]["prompts"] == 20
    assert all(p["measured"] <= p["facts"] and len(p["missed"]) <= p["measured"]
               for p in report["retention_curve"])


def test_a_dropped_connection_is_asked_again(tmp_path):
    """A server that hangs up on the first generation request: the evaluator asks again."""
    import threading
    from http.server import ThreadingHTTPServer

    from client.eval import Evaluator
    from client.sdk import MomeClient
    from tests.utils.json_http import JSONHandler

    posts = []

    class HangsUpOnce(JSONHandler):
        def do_GET(self):  # /v1/models
            self.reply(200, {"data": [{"id": "m"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(self.path)
            if len(posts) == 1:
                self.close_connection = True  # no response at all, as a dropped socket
                return
            self.reply(200, {"choices": [{"text": " Paris"}]})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HangsUpOnce)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with MomeClient(f"http://127.0.0.1:{httpd.server_port}") as client:
            evaluator = Evaluator(client, tmp_path, log=lambda _: None)
            assert evaluator.generate("The capital of France is", False, 4).text == " Paris"
        assert posts == ["/v1/completions", "/v1/completions"]
    finally:
        httpd.shutdown()


# Floors under what 60-fact runs measure (reports/METHODS.md), for a 12-fact slice: one
# prompt is 1/12 of a figure here.
GENERALIZATION_FLOOR = 0.6
FACT_AFTER_UNRELATED_FLOOR = 0.6
NEAR_MISS_RELATION_FLOOR = 0.75


def test_eval_chat_facts_posted_without_subject(server, tmp_path):
    """Issue 12's floors on a zsRE slice, posted as users post facts (no `subject`): the
    fact answers its question and rephrasings, leaves other questions and later turns of a
    conversation alone."""
    # 12 facts; the rows after them are the pool other-entity near misses are drawn from.
    rows = (DATA.parent / "zsre-slice.jsonl").read_text().splitlines()[60:]
    n_facts = 12
    data = tmp_path / "zsre.jsonl"
    data.write_text("\n".join(rows) + "\n")
    report_dir = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "eval", "--data", str(data), "--format", "zsre",
         "--url", server.url, "--admin-key", "test-admin-key", "--report", str(report_dir),
         "--limit", str(n_facts), "--no-subject", "--window", "3"],
        capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["format"] == "zsre" and report["subject"] is False
    assert report["n_facts"] == n_facts and report["memorized"] == n_facts
    assert report["reliability"] >= 0.95
    assert report["generalization"] >= GENERALIZATION_FLOOR
    assert report["locality"] >= 0.9
    assert report["multi_turn"]["unrelated_after_fact_unchanged"] >= 0.9
    assert report["multi_turn"]["fact_after_unrelated_exact"] >= FACT_AFTER_UNRELATED_FLOOR
    near = report["near_miss"]
    if near["other_entity"]["prompts"]:  # another entity's question keeps its answer
        assert near["other_entity"]["locality"] >= 0.9, near
    # The same entity asked another relation: the second key, compared through the relation
    # map, keeps its answer (12 of 12 here when set; 0.970 on 200 held-out facts).
    assert near["other_relation"]["prompts"] == n_facts
    assert near["other_relation"]["locality"] >= NEAR_MISS_RELATION_FLOOR, near
