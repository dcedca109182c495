"""Other wordings of a chat fact's question, studied offline (issue 12, model/rewordings.py).

Four studies, each printing its figures (from the repository root):

    python reports/rewordings-offline/rewordings.py match ROWS.jsonl
        how many questions the template bank matches, and how often a filled template is
        the row's own rephrasing word for word (training on it would be training on the
        evaluation's paraphrase)
    python reports/rewordings-offline/rewordings.py centroid TUNING_CASES HELD_OUT_CASES
        second-key pass rates of rephrasings and other-relation near misses, per gate, for
        the question's own relation mean, the centroid of it and its wordings', and "any of
        them" (several second keys)
    python reports/rewordings-offline/rewordings.py lean ROWS.jsonl
        whether the subject key fires on the rephrasing (at the global gate) when it leans
        toward the subject's query in the wordings, as chat keys lean behind history
    python reports/rewordings-offline/rewordings.py misses RUN_DIR [KIND]
        per rephrasing a finished run missed (KIND turn_fact_after_unrelated: per fact it
        missed when asked after an unrelated exchange): the subject key's best cosine over
        the turn being answered against its expert's threshold, and the second key's score
        (passes at 1)

ROWS: zsRE rows as the data has them (src, rephrase, subject); CASES: a run's cases.jsonl.
The bank is the server's own (`model/data/relation_rows.jsonl`, zsRE rows 100-399).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.backbone import resolve_model_dir  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.expert_gates import lean_toward  # noqa: E402
from model.facts import choose_locus, content_positions, encode_fact  # noqa: E402
from model.reference import ReferenceModel, right_padded  # noqa: E402
from model.relation_key import relation_mean  # noqa: E402
from model.relation_map import question_means  # noqa: E402
from model.rewordings import Rewordings, normal  # noqa: E402
from model.router import Router  # noqa: E402
from model.turn_scope import user_turn_marker  # noqa: E402
from server.memory_setup import ensure_router  # noqa: E402

F = torch.nn.functional
GATES = np.round(np.arange(0.30, 0.80, 0.05), 2)


class Lab:
    def __init__(self, router_dir: Path | None = None):
        cfg = self.cfg = MemoryConfig()
        model_dir = resolve_model_dir(None)
        self.ref = ReferenceModel(model_dir, cfg.layer, threads=2)
        self.tok = self.ref.tokenizer
        self.router = Router.load(router_dir or ensure_router(model_dir, self.ref, cfg.layer,
                                                              cfg.d_k))
        self.bank = Rewordings(self.means)

    def means(self, questions: list[str]) -> torch.Tensor:
        return self.router.relation_view(question_means(self.ref, self.router, questions))

    def queries(self, questions: list[str | list[dict]]) -> list[tuple]:
        """(fact, raw queries (T, d_k)) per chat question asked alone, or per conversation
        (a list of messages, the question last)."""
        facts = [encode_fact(self.tok, {"messages" if isinstance(q, list) else "question": q,
                                        "answer": "-"}, 2048) for q in questions]
        out = []
        for start in range(0, len(facts), 32):
            chunk = facts[start:start + 32]
            with torch.no_grad():
                h, _ = self.ref.lower(right_padded([f.prompt_ids for f in chunk]))
                raw = self.router.whiten(h)
            out += [(f, raw[j, :len(f.prompt_ids)]) for j, f in enumerate(chunk)]
        return out


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def match(lab: Lab, rows: list[dict]) -> None:
    means = lab.means([r["src"] for r in rows])
    matched = verbatim = 0
    for row, mean in zip(rows, means):
        asked = lab.bank.of(row["src"], None, mean, 3)
        matched += bool(asked)
        verbatim += any(normal(q) == normal(row.get("rephrase", "")) for q in asked)
    print(f"bank: {len(lab.bank.templates)} templates, {len(lab.bank.members)} relations")
    print(f"{len(rows)} questions: {matched} reworded, {verbatim} with their own rephrasing "
          "among the wordings")


def probe_prompts(path: str) -> list[tuple[str, str, str]]:
    out = []
    for case in read_jsonl(path):
        p = {q["kind"]: q["prompt"] for q in case["probes"] if isinstance(q["prompt"], str)}
        if {"reliability", "paraphrase", "near_miss_relation"} <= p.keys():
            out.append((p["reliability"], p["paraphrase"], p["near_miss_relation"]))
    return out


def centroid(lab: Lab, runs: dict[str, str]) -> None:
    for split, path in runs.items():
        rows = probe_prompts(path)
        m = lab.means([q for r in rows for q in r]).reshape(len(rows), 3, -1)
        own, para, near = m[:, 0], m[:, 1], m[:, 2]
        scores = {"own": ([], []), "centroid": ([], []), "any": ([], [])}
        for i, row in enumerate(rows):
            asked = lab.bank.of(row[0], None, own[i], 3)
            keys = torch.cat([own[i:i + 1], lab.means(asked) if asked else own[:0]])
            mid = F.normalize(keys.sum(0), dim=-1)
            for name, p, n in [("own", own[i] @ para[i], own[i] @ near[i]),
                               ("centroid", mid @ para[i], mid @ near[i]),
                               ("any", (keys @ para[i]).max(), (keys @ near[i]).max())]:
                scores[name][0].append(float(p))
                scores[name][1].append(float(n))
        for name, (p, n) in scores.items():
            for g in GATES:
                print(f"{split} {name:8s} gate {g:.2f}: rephrasings pass "
                      f"{np.mean(np.array(p) >= g):.3f}, near misses pass {np.mean(np.array(n) >= g):.3f}")


def lean(lab: Lab, rows: list[dict]) -> None:
    asked_of = lab.queries([r["src"] for r in rows])
    means = lab.means([r["src"] for r in rows])
    alone, toward = [], []
    for (fact, raw), row, mean in zip(asked_of, rows, means):
        alone.append(F.normalize(raw[choose_locus(fact, raw, lab.tok)], dim=-1))
        views = lab.queries(lab.bank.of(row["src"], None, mean, 3))
        at = [F.normalize(r[v.subject_span[1] - 1], dim=-1) for v, r in views if v.subject_span]
        toward.append(F.normalize(torch.stack(at).mean(0), dim=-1) if at else alone[-1])
    alone, toward = torch.stack(alone), torch.stack(toward)
    rephrased = [F.normalize(raw[content_positions(f, lab.tok)], dim=-1)
                 for f, raw in lab.queries([r["rephrase"] for r in rows])]
    for floor in (None, 0.985, 0.97, 0.95):
        keys = alone if floor is None else lean_toward(alone, toward, floor)
        fires = sum(float((q @ k).max()) >= lab.cfg.gate for q, k in zip(rephrased, keys))
        print(f"key leaning to floor {floor}: fires on {fires} of {len(rows)} rephrasings")


def misses(run: Path, kind: str = "paraphrase") -> None:
    lab = Lab(run / "store" / "router")
    marker = user_turn_marker(lab.tok)
    owners = np.fromfile(run / "store" / "owners.i64", dtype=np.int64)
    keys = np.fromfile(run / "store" / "keys.f32", dtype=np.float32).reshape(len(owners), -1)
    second = np.fromfile(run / "store" / "relations.f32", dtype=np.float32).reshape(
        len(owners), -1)
    counts = {"subject key below its threshold": 0, "second key below": 0, "both pass": 0}
    for case in read_jsonl(str(run / "cases.jsonl")):
        expert = int(np.flatnonzero(owners == int(case["fact_id"].split("-")[1]))[0])
        key = torch.from_numpy(keys[expert])
        threshold = lab.cfg.gate / float(key.norm())
        for probe in case["probes"]:
            if probe["kind"] != kind or probe["hit"]:
                continue
            [(fact, raw)] = lab.queries([probe["prompt"]])
            words = content_positions(fact, lab.tok)
            cos = F.normalize(raw[words], dim=-1) @ F.normalize(key, dim=-1)
            at = words[int(cos.argmax())]
            mean = relation_mean(fact.prompt_ids, raw, at, lab.tok, marker)
            score = (float(lab.router.relation_view(mean) @ torch.from_numpy(second[expert]))
                     if mean is not None else float("nan"))
            fired = float(cos.max()) >= threshold
            counts["subject key below its threshold" if not fired else
                   "second key below" if score < 1 else "both pass"] += 1
            asked = probe["prompt"] if kind == "paraphrase" else probe["prompt"][-1]["content"]
            print(f"{asked[:60]:60s} subject {float(cos.max()):.3f} "
                  f"(threshold {threshold:.3f}), second key {score:.2f}")
    print(counts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("study", choices=["match", "centroid", "lean", "misses"])
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args()
    if args.study == "misses":
        return misses(Path(args.inputs[0]), *args.inputs[1:2])
    lab = Lab()
    if args.study == "centroid":
        return centroid(lab, {"tuning": args.inputs[0], "held_out": args.inputs[1]})
    rows = [r for r in read_jsonl(args.inputs[0]) if r.get("src") and r.get("rephrase")]
    (match if args.study == "match" else lean)(lab, rows)


if __name__ == "__main__":
    main()
