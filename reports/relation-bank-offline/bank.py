"""A relation-template bank for the second key, scored offline on finished runs (issue 12).

The served second key is one relation mean per fact, from its own question. zsRE
rephrasings reword the relation ("live when he died" / "live in when he died"), so a
rephrasing's relation mean can fall below the gate. Here a bank of question templates
(a question with its subject cut out, "{}" in its place) is grouped into relations from
tuning rows only: a row's question template and its rephrase template are one relation
(union-find). A new fact's question is matched to the nearest bank template by its relation
mean; the templates of that relation are filled with the fact's guessed subject; each
filled question gives a relation mean. Variants of the fact's second key:

- `own`: its own question's mean (as served today);
- `any`: passes when any of own + the relation's filled means passes (several keys);
- `centroid`: one key, the unit mean of own + the filled means.

Scored as reports/conjunction-offline/conjunction.py scores: on a run made with the subject
key alone, a probe whose fired facts are all blocked gets the run's base output.

Usage, from the repository root:
    python reports/relation-bank-offline/bank.py DATA BANK_ROWS TUNING_CASES HELD_OUT_CASES OUT

BANK_ROWS: row ranges of DATA the bank is built from, e.g. 0-100,160-400 (never rows of
the runs scored). The threshold of each variant is chosen on the tuning run only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conjunction-offline"))

from conjunction import (  # noqa: E402
    TurnQueries,
    choose_threshold,
    figures,
    read_cases,
)

from model.backbone import resolve_model_dir  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.facts import choose_locus  # noqa: E402
from model.reference import ReferenceModel  # noqa: E402
from model.router import Router  # noqa: E402
from model.subject_guess import guess_subject  # noqa: E402
from model.turn_scope import scope_start  # noqa: E402
from server.memory_setup import ensure_router  # noqa: E402

VARIANTS = ("own", "any", "centroid")
MAX_FILLED = 8  # templates of a relation filled per fact (the most used first)


def normal(t: str) -> str:
    return " ".join(t.lower().split())


def cut(question: str, subject: str) -> str | None:
    return question.replace(subject, "{}", 1) if subject and subject in question else None


class Bank:
    """Templates, their relation (union-find root), use counts and embeddings."""

    def __init__(self, tq: TurnQueries, rows: list[dict]):
        parent: dict[str, str] = {}
        uses: dict[str, int] = {}
        text: dict[str, str] = {}  # normal form -> a template as written
        example: dict[str, str] = {}  # normal form -> a subject it was seen with

        def find(t):
            while parent[t] != t:
                parent[t] = parent[parent[t]]
                t = parent[t]
            return t

        skipped = 0
        for row in rows:
            pair = [cut(row["src"], row["subject"]), cut(row.get("rephrase", ""), row["subject"])]
            pair = [p for p in pair if p]
            if not pair:
                skipped += 1
                continue
            for p in pair:
                n = normal(p)
                parent.setdefault(n, n)
                text.setdefault(n, p)
                example.setdefault(n, row["subject"])
                uses[n] = uses.get(n, 0) + 1
            if len(pair) == 2:
                a, b = find(normal(pair[0])), find(normal(pair[1]))
                parent[a] = b
        self.templates = sorted(parent)
        self.group = {t: find(t) for t in self.templates}
        self.uses, self.text, self.skipped = uses, text, skipped
        self.members: dict[str, list[str]] = {}
        for t in self.templates:
            self.members.setdefault(self.group[t], []).append(t)
        for g in self.members.values():
            g.sort(key=lambda t: (-uses[t], t))
        self.tq = tq
        self.embeddings = torch.stack([
            relation_key(tq, self.text[t].replace("{}", example[t]))[0]
            for t in self.templates])

    def relation_of(self, mean: torch.Tensor) -> tuple[str, float]:
        cos = self.embeddings @ mean
        i = int(cos.argmax())
        return self.group[self.templates[i]], float(cos[i])


def relation_key(tq: TurnQueries, question: str, chat: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(relation mean, subject key) of a fact's prompt posted without subject."""
    fact = tq.encode(question, chat, "-")
    raw, unit = tq.unit_queries(fact.prompt_ids)
    locus = choose_locus(fact, raw[:len(fact.prompt_ids)], tq.tok)
    return tq.means(fact, unit, locus)["relation"], unit[locus]


def fact_keys(tq: TurnQueries, bank: Bank, question: str) -> dict:
    own, subject_key = relation_key(tq, question)
    group, match = bank.relation_of(own)
    guessed = guess_subject(question)
    filled = []
    if guessed is not None:
        subject = question[guessed[0]:guessed[1]]
        for t in bank.members[group][:MAX_FILLED]:
            q = bank.text[t].replace("{}", subject, 1)
            if normal(q) != normal(question):
                filled.append(relation_key(tq, q)[0])
    keys = torch.stack([own, *filled])
    outside = torch.tensor([bank.group[t] != group for t in bank.templates])
    return {"subject": subject_key, "own": own, "all": keys, "match": match,
            "outside": bank.embeddings[outside],
            "group_size": len(bank.members[group]), "filled": len(filled),
            "centroid": torch.nn.functional.normalize(keys.sum(0), dim=-1)}


class ProbeMeans:
    """A probe's relation mean, leaving out where a fact's subject key fires best."""

    def __init__(self, tq: TurnQueries):
        self.tq, self.cache = tq, {}

    def __call__(self, prompt, subject_key: torch.Tensor, chat: bool = True) -> torch.Tensor:
        key = json.dumps(prompt)
        if key not in self.cache:
            probe = self.tq.encode(prompt, chat)
            self.cache[key] = (probe, self.tq.unit_queries(probe.prompt_ids)[1])
        probe, unit = self.cache[key]
        start = scope_start(probe.prompt_ids, self.tq.marker)
        at = start + int((unit[start:] @ subject_key).argmax())
        return self.tq.means(probe, unit, at)["relation"]


def score_fired(spec: str, score) -> list[dict]:
    """Per probe of a run: kind, hit as run, base hit, and `score(fact question, probe
    prompt, chat)` for each fact that fired on it (a dict of cosines per variant)."""
    questions = {}
    for case in read_cases(spec.partition(":")[0]):
        rel = next(p for p in case["probes"] if p["kind"] == "reliability")
        questions[case["fact_id"]] = rel["prompt"]
    rows = []
    for case in read_cases(spec):
        for probe in case["probes"]:
            fired = [f for f in probe.get("mome_facts") or [] if f in questions]
            rows.append({"case": case["case"], "kind": probe["kind"], "hit": probe["hit"],
                         "base_hit": probe.get("base_hit"),
                         "fired": {f: score(questions[f], probe["prompt"], case["chat"])
                                   for f in fired}})
    return rows


def score_run(tq: TurnQueries, bank: Bank, spec: str) -> tuple[list[dict], list[dict]]:
    probe_mean = ProbeMeans(tq)
    keys: dict[str, dict] = {}

    def score(question: str, prompt, chat: bool) -> dict:
        if question not in keys:
            keys[question] = fact_keys(tq, bank, question)
        k = keys[question]
        mean = probe_mean(prompt, k["subject"])
        return {"own": float(mean @ k["own"]), "any": float((k["all"] @ mean).max()),
                "centroid": float(mean @ k["centroid"]),
                "other": float((k["outside"] @ mean).max())}

    rows = score_fired(spec, score)
    facts = [{"question": q, "match": round(k["match"], 4), "group_size": k["group_size"],
              "filled": k["filled"]} for q, k in keys.items()]
    return rows, facts


def load_bank_rows(data: Path, bank_rows: str) -> tuple[TurnQueries, list[dict]]:
    """The router's view of the backbone (as the server keys facts) and the bank's rows."""
    lines = Path(data).read_text().splitlines()
    rows = [json.loads(lines[i]) for i in row_ranges(bank_rows)]
    cfg = MemoryConfig()
    model_dir = resolve_model_dir(None)
    ref = ReferenceModel(model_dir, cfg.layer, threads=2)
    router = Router.load(ensure_router(model_dir, ref, cfg.layer, cfg.d_k))
    return TurnQueries(ref, router), rows


def row_ranges(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, hi = map(int, part.split("-"))
        out.extend(range(lo, hi))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("bank_rows")
    parser.add_argument("tuning")
    parser.add_argument("held_out")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.95, 0.9, 0.85])
    args = parser.parse_args()

    tq, rows = load_bank_rows(args.data, args.bank_rows)
    bank = Bank(tq, rows)
    scored, facts = {}, {}
    for split, spec in (("tuning", args.tuning), ("held_out", args.held_out)):
        scored[split], facts[split] = score_run(tq, bank, spec)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "scores.jsonl").open("w") as f:
        for split, split_rows in scored.items():
            for row in split_rows:
                f.write(json.dumps({"split": split, **row}) + "\n")
    report = {"data": str(args.data), "bank_rows": args.bank_rows,
              "bank": {"templates": len(bank.templates), "relations": len(bank.members),
                       "rows_skipped": bank.skipped},
              "facts": facts, "as_run": {s: figures(r, None, None) for s, r in scored.items()},
              "variants": []}
    for variant in VARIANTS:
        for keep in args.keep:
            threshold = choose_threshold(scored["tuning"], variant, keep)
            report["variants"].append({
                "variant": variant, "keep_tuning_paraphrases": keep,
                "threshold": round(threshold, 4),
                **{s: figures(r, variant, threshold) for s, r in scored.items()}})
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    kinds = ("reliability", "paraphrase", "near_miss_relation", "turn_fact_after_unrelated")
    print("| variant | keep | threshold | split | " + " | ".join(kinds) + " |")  # noqa: T201
    for split in scored:
        f = report["as_run"][split]
        print(f"| as run | - | - | {split} | "  # noqa: T201
              + " | ".join(f"{f[k]['hit']:.3f}" for k in kinds if k in f) + " |")
    for v in report["variants"]:
        for split in scored:
            f = v[split]
            print(f"| {v['variant']} | {v['keep_tuning_paraphrases']} | {v['threshold']} | "  # noqa: T201
                  f"{split} | " + " | ".join(f"{f[k]['hit']:.3f} ({f[k]['blocked']})"
                                           for k in kinds if k in f) + " |")


if __name__ == "__main__":
    main()
