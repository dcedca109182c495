"""Per-prompt outcomes of `mome eval` (`cases.jsonl`) and the headline figures computed from them.

`cases.jsonl` has one line per case: `case` (index in the run), `line` (in the data file),
`fact_id`, `subject`, `target`, `chat`, `sampled`, `superseded`, `memorized`, and `probes`,
one per prompt asked (kinds in client/eval_probes.py): `kind`, `prompt` (a string, or the
chat messages), `base` (the base model's output, before memorization; null where not
recorded), `output` (after memorization; null where not measured), `hit` (null where not
measured), `mome_facts` and `base_mome_facts` (fact ids the server said fired), `base_hit`
for the kinds that expect the target, and `names_memorized_subject` (the memorized subject the
prompt names, or null) for locality prompts.

`summarize(records)` computes every headline figure of the report from these lines alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from client.eval_data import EvalCase, starts_with
from client.eval_nearmiss import SubjectMatcher
from client.eval_probes import TARGET, Generation, Probe

NEAR_MISS = ("near_miss_entity", "near_miss_relation")


def probe_record(p: Probe, c: EvalCase, base: Generation | None, after: Generation | None,
                 matcher: SubjectMatcher) -> dict:
    rec = {"kind": p.kind, "prompt": p.prompt, "base": base and base.text,
           "output": after and after.text, "hit": _hit(p, c, base, after),
           "mome_facts": after and after.facts, "base_mome_facts": base and base.facts}
    if p.expect == TARGET:
        rec["base_hit"] = starts_with(base.text, c.target) if base else None
    if p.kind == "locality":
        rec["names_memorized_subject"] = matcher.find(p.prompt)
    return rec


def _hit(p: Probe, c: EvalCase, base: Generation | None, after: Generation | None) -> bool | None:
    if p.expect == TARGET:
        seen = after if p.after else base  # the in-context baseline is the base model's
        return starts_with(seen.text, c.target) if seen else None
    return after.text == base.text if after and base else None


def case_records(cases: list[EvalCase], probes: list[Probe], base: dict[str, Generation],
                 after: dict[str, Generation], run: dict) -> list[dict]:
    """`run`: sampled, replaced, memorized (sets of case indexes) and fact_ids."""
    matcher = SubjectMatcher(cases[i].subject for i in run["memorized"])
    records = [{"case": i, "line": c.line, "fact_id": run["fact_ids"].get(str(i)),
                "subject": c.subject, "target": c.target, "chat": c.chat,
                "sampled": i in run["sampled"], "superseded": i in run["replaced"],
                "memorized": i in run["memorized"], "probes": []}
               for i, c in enumerate(cases)]
    for p in probes:
        records[p.case]["probes"].append(probe_record(
            p, cases[p.case], base.get(p.key), after.get(p.key) if p.after else None, matcher))
    return records


def write_cases(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    tmp.replace(path)


def read_cases_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _hits(records: list[dict], kinds, field: str = "hit", where=None) -> list[bool]:
    return [p[field] for r in records for p in r["probes"]
            if p["kind"] in kinds and p.get(field) is not None and (where is None or where(p))]


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict]) -> dict:
    """The report's headline figures, from the per-prompt outcomes alone."""
    reliable = _hits(records, ("reliability",))
    para = _hits(records, ("paraphrase",))
    loc = _hits(records, ("locality",))
    clean = _hits(records, ("locality",), where=lambda p: p["names_memorized_subject"] is None)
    near = {kind: _hits(records, (kind,)) for kind in NEAR_MISS}
    sampled = [r for r in records if r["sampled"]]
    return {
        "reliability": _mean(reliable),
        "generalization": _mean(para),
        "locality": _mean(loc),
        "locality_clean": _mean(clean),
        "near_miss_locality": _mean(near[NEAR_MISS[0]] + near[NEAR_MISS[1]]),
        "near_miss": {name: {"locality": _mean(near[kind]), "prompts": len(near[kind])}
                      for name, kind in (("other_entity", "near_miss_entity"),
                                         ("other_relation", "near_miss_relation"))},
        "multi_turn": _multi_turn(records),
        "in_context": _in_context(records),
        "base_reliability": _mean(_hits(records, ("reliability",), "base_hit")),
        "measured_facts": {"reliability": sum(not r["superseded"] for r in records),
                           "generalization": sum(not r["superseded"] for r in sampled),
                           "locality": len(sampled), "base_reliability": len(sampled)},
        "measured_prompts": {"reliability": len(reliable), "generalization": len(para),
                             "locality": len(loc), "locality_clean": len(clean),
                             "near_miss": len(near[NEAR_MISS[0]]) + len(near[NEAR_MISS[1]])},
    }


def _multi_turn(records: list[dict]) -> dict | None:
    if not any(r["chat"] for r in records):
        return None  # completion facts: no conversation to ask them in
    after = _hits(records, ("turn_unrelated_after_fact",))
    fact = _hits(records, ("turn_fact_after_unrelated",))
    return {"unrelated_after_fact_unchanged": _mean(after), "fact_after_unrelated_exact": _mean(fact),
            "prompts": {"unrelated_after_fact": len(after), "fact_after_unrelated": len(fact)}}


def _in_context(records: list[dict]) -> dict | None:
    rel, para = _hits(records, ("in_context",)), _hits(records, ("in_context_paraphrase",))
    if not rel and not para:
        return None
    return {"reliability": _mean(rel), "generalization": _mean(para),
            "prompts": {"reliability": len(rel), "generalization": len(para)}}
