"""`mome eval`'s rules, each on its own: bad rows, near misses, subject matching, retention
sampling, chat messages, and resuming a state written before the output logs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import AutoTokenizer

from client.eval import Evaluator, prepare_cases
from client.eval_cases import summarize
from client.eval_data import EvalCase, answer_tokens, read_cases
from client.eval_nearmiss import Relations, SubjectMatcher, attach_near_misses, template
from client.eval_probes import Generation
from model.backbone import pull_default_model

DATA = Path(__file__).resolve().parents[1] / "data"


def test_bad_rows_are_reported_with_their_line_and_skipped(tmp_path):
    loaded = read_cases(str(DATA / "zsre-slice.jsonl"), "zsre")
    assert len(loaded.cases) == 100 and loaded.bad == [{"line": 101, "reason": "empty alt"}]
    good = {"prompt": "P is", "target_new": "T", "subject": "P", "ground_truth": "G",
            "rephrase_prompt": "R", "locality_prompt": "L", "locality_ground_truth": "M"}
    rows = [json.dumps(good), "{not json", json.dumps({**good, "target_new": " "}),
            json.dumps({k: v for k, v in good.items() if k != "rephrase_prompt"}), "",
            json.dumps([1]), json.dumps(good)]
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(rows) + "\n")
    loaded = read_cases(str(path), "counterfact")
    assert [c.line for c in loaded.cases] == [1, 7] and len(loaded.truths) == 2
    assert loaded.bad == [{"line": 2, "reason": "not JSON (Expecting property name enclosed in "
                                                 "double quotes)"},
                          {"line": 3, "reason": "empty target_new"},
                          {"line": 4, "reason": "no rephrase_prompt"},
                          {"line": 6, "reason": "not a JSON object"}]


def test_only_the_bad_rows_a_run_covers_are_reported():
    logged = []
    cases, _, bad = prepare_cases(str(DATA / "zsre-slice.jsonl"), "zsre", 50, log=logged.append)
    assert len(cases) == 50 and bad == [] and logged == []
    cases, _, bad = prepare_cases(str(DATA / "zsre-slice.jsonl"), "zsre", None, log=logged.append)
    assert len(cases) == 100 and bad == [{"line": 101, "reason": "empty alt"}]
    assert logged == ["skipping 1 bad row: line 101 (empty alt)"]


def test_lower_case_asks_every_question_in_lower_case_and_keeps_the_answers():
    cased, _, _ = prepare_cases(str(DATA / "zsre-slice.jsonl"), "zsre", 40, log=print)
    lower, _, _ = prepare_cases(str(DATA / "zsre-slice.jsonl"), "zsre", 40, log=print,
                                lower_case=True)
    assert [c.prompt.lower() for c in cased] == [c.prompt for c in lower]
    assert any(c.prompt != c.prompt.lower() for c in cased)
    assert [c.target for c in cased] == [c.target for c in lower]
    assert all(p == p.lower() for c in lower for p in c.paraphrases)
    # Near misses are built from the lower-cased questions, so they read like the user's too.
    assert all(p == p.lower() for c in lower for kind, p in c.near_misses
               if kind == "near_miss_relation")
    assert all(c.fact(with_subject=True).get("subject") == c.subject for c in lower if c.subject)


def test_near_misses_follow_the_rules_on_counterfact():
    pool = read_cases(str(DATA / "counterfact-slice.jsonl"), "counterfact").cases
    cases = pool[:60]
    attach_near_misses(cases, pool)
    relations = Relations(pool)
    subjects = SubjectMatcher(c.subject for c in cases)
    kinds = {"near_miss_entity": 0, "near_miss_relation": 0}
    for case in cases:
        own = template(case)
        for kind, prompt in case.near_misses:
            kinds[kind] += 1
            if kind == "near_miss_entity":  # another row's prompt, same template, unmemorized
                other = next(r for r in pool if r.prompt == prompt)
                assert template(other) == own and subjects.find(prompt) is None
            else:  # this subject, a template of another relation, answers disjoint
                assert case.subject in prompt and prompt not in {c.prompt for c in cases}
                t = prompt.replace(case.subject, "{}", 1)
                assert relations.group(t) != relations.group(own)
                assert not relations.answers[relations.group(t)] & relations.answers[relations.group(own)]
    assert kinds["near_miss_entity"] >= 50 and kinds["near_miss_relation"] == 60
    again = [EvalCase(c.prompt, c.target, c.chat, c.subject, c.paraphrases, c.locality,
                      answers=c.answers) for c in cases]
    attach_near_misses(again, pool)
    assert [c.near_misses for c in again] == [c.near_misses for c in cases]  # by rule


def test_templates_linked_by_a_neighbourhood_prompt_are_one_relation():
    rows = [EvalCase("The mother tongue of A is", "X", False, "A", locality=["B is a native speaker of"]),
            EvalCase("C is a native speaker of", "Y", False, "C"),
            EvalCase("D works as", "Z", False, "D")]
    relations = Relations(rows)
    assert relations.group("The mother tongue of {} is") == relations.group("{} is a native speaker of")
    assert relations.other_relations(frozenset({"The mother tongue of {} is"})) == ["{} works as"]


def test_subjects_are_found_case_insensitively_as_substrings():
    matcher = SubjectMatcher(["Danielle Darrieux", "Paul", "Io", ""])
    assert matcher.find("The films of DANIELLE darrieux are") == "danielle darrieux"
    assert matcher.find("Pauline is a native speaker of") == "paul"
    assert matcher.find("The moon io") == "io" and matcher.find("Nothing here") is None


class StubEvaluator(Evaluator):
    """Generation stubbed: a prompt answers its target when its number is in `knows`."""

    def __init__(self, report_dir, knows, client=None):
        super().__init__(client, report_dir, log=lambda _: None)
        self.knows = knows
        self.asked = []

    def generate(self, prompt, chat, max_tokens):
        self.asked.append(prompt)
        number = int(prompt.split()[1]) if str(prompt).startswith("Fact ") else -1
        return Generation(f" answer {number}" if number in self.knows else " no", [])


def test_retention_measures_every_fact_up_to_1000_then_a_sample(tmp_path):
    cases = [EvalCase(f"Fact {i} is", f"answer {i}", False) for i in range(1500)]
    evaluator = StubEvaluator(tmp_path, knows=set(range(1500)) - {7, 1200})
    evaluator.state = {"memorized": list(range(1000))}
    point = evaluator.retention(cases, 1000, random.Random(0))
    assert point == {"facts": 1000, "reliability": 0.999, "measured": 1000, "missed": [7]}
    evaluator.state = {"memorized": list(range(1500))}
    point = evaluator.retention(cases, 1500, random.Random(0))
    assert point["measured"] == 200 and len(evaluator.asked) == 1200
    assert set(point["missed"]) <= {7, 1200}


def test_a_chat_probe_is_sent_as_its_list_of_messages(tmp_path):
    sent = []

    class Client:
        def chat(self, messages, **params):
            sent.append(messages)
            return {"choices": [{"message": {"content": "Ann"}}], "mome_facts": ["fact-3"]}

    evaluator = Evaluator(Client(), tmp_path, log=lambda _: None)
    turns = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}]
    assert evaluator.generate(turns, True, 8) == Generation("Ann", ["fact-3"])
    assert evaluator.generate("Q", True, 8).facts == ["fact-3"]
    assert sent == [turns, [{"role": "user", "content": "Q"}]]


def test_a_state_from_before_the_output_logs_resumes(tmp_path):
    """Written by the previous version: base locality as a list, base reliability a float."""
    class Client:
        def request(self, method, path):
            return {"experts": 2, "store_bytes": 0, "config": {}, "train": {}, "router": {}}

    cases = [EvalCase(f"Fact {i} is", f"answer {i}", False, locality=[f"Other {i} is"])
             for i in range(2)]
    config = {"data": "d", "format": "jsonl", "limit": None, "sample": None}
    (tmp_path / "state.json").write_text(json.dumps({
        "config": config, "base": {"locality": [" no", " changed"], "reliability": 0.25},
        "ppl_before": None, "memorized": [0, 1], "seconds": [1.0, 1.0], "failed": [],
        "curve": [{"facts": 2, "reliability": 1.0}], "in_flight": {}}))
    evaluator = StubEvaluator(tmp_path, knows={0, 1}, client=Client())
    report = evaluator.run(cases, [], config)
    assert report["reliability"] == 1.0 and report["locality"] == 0.5
    assert report["base_reliability"] == 0.25 and report["retention_curve"][0]["facts"] == 2
    assert "locality" not in json.loads((tmp_path / "state.json").read_text())["base"]


def test_superseded_and_unmeasured_prompts_count_nowhere():
    def probe(kind, hit, **extra):
        return {"kind": kind, "hit": hit, "base_hit": False, **extra}

    records = [
        {"sampled": True, "superseded": True, "chat": False,
         "probes": [probe("reliability", None), probe("locality", True, names_memorized_subject=None)]},
        {"sampled": True, "superseded": False, "chat": False,
         "probes": [probe("reliability", True), probe("paraphrase", False),
                    probe("locality", False, names_memorized_subject="x"),
                    probe("near_miss_relation", None)]},
        {"sampled": False, "superseded": False, "chat": False, "probes": [probe("reliability", False)]},
    ]
    figures = summarize(records)
    assert figures["reliability"] == 0.5 and figures["generalization"] == 0.0
    assert figures["locality"] == 0.5 and figures["locality_clean"] == 1.0
    assert figures["near_miss_locality"] is None and figures["multi_turn"] is None
    assert figures["measured_facts"] == {"reliability": 2, "generalization": 1, "locality": 2,
                                         "base_reliability": 2}


def test_every_target_gets_enough_tokens_to_be_seen_whole():
    tokenizer = AutoTokenizer.from_pretrained(pull_default_model())
    targets = [c.target for name, fmt in (("zsre-slice.jsonl", "zsre"),
                                          ("counterfact-slice.jsonl", "counterfact"))
               for c in read_cases(str(DATA / name), fmt).cases]
    targets.append("Jean-Baptiste-Alexandre Massy")  # cut at "Mass" by the old word count
    for target in targets:
        # As generated after the answer's first token: with a leading space, or alone.
        needed = max(len(tokenizer(" " + target, add_special_tokens=False).input_ids),
                     len(tokenizer(target, add_special_tokens=False).input_ids))
        assert answer_tokens(target) >= needed, target
