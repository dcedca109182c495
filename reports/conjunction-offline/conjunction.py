"""What the second-key conjunction would do to a finished `mome eval` run (issue 12, offline).

The planned conjunction (reports/METHODS.md, "What the second-key conjunction needs here")
lets a fact's expert fire only where its subject key passes the gate (as today) *and* the
mean whitened query over the turn being answered, less the firing token, matches the fact's
own question's (its "turn key"). A firing the second key blocks leaves the output as the
base model's: on a probe where every fired fact is blocked, the output becomes the run's
`base` output, exactly, and where none is, it stays the run's `output`. So a run's
`cases.jsonl` (per-probe outputs, base outputs and `mome_facts`) gives the conjunction's
generation-based figures without training anything. Probes where only some fired facts are
blocked keep their output (counted per kind as `partly_blocked`); a blocked probe whose base
output the run did not record (`--sample`) cannot be scored and is left out (`unscored`).

Usage, from the repository root (the router of the server's default store layout):
    python reports/conjunction-offline/conjunction.py TUNING_CASES HELD_OUT_CASES OUT_DIR

(a cases argument may name a range of a run's cases, PATH:LO-HI).

The threshold is chosen on the tuning run only (the highest that keeps `--keep` of the
paraphrase probes the memorized run answered), then applied to the held-out run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.backbone import resolve_model_dir  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.facts import (  # noqa: E402
    EncodedFact,
    choose_locus,
    content_positions,
    encode_fact,
    history_views,
)
from model.reference import ReferenceModel  # noqa: E402
from model.router import Router  # noqa: E402
from model.turn_scope import scope_start, user_turn_marker  # noqa: E402
from server.memory_setup import ensure_router  # noqa: E402

FIRING_KINDS = ("reliability", "paraphrase", "near_miss_relation", "near_miss_entity",
                "locality", "turn_unrelated_after_fact", "turn_fact_after_unrelated")
# Probes that should keep the base output (a hit = output unchanged) versus the answer.
KEEP_BASE = {"near_miss_relation", "near_miss_entity", "locality", "turn_unrelated_after_fact"}


SPANS = ("turn", "content", "relation", "sentence")
VARIANTS = SPANS + tuple(f"{s}_leaned" for s in SPANS)


class TurnQueries:
    def __init__(self, ref: ReferenceModel, router: Router):
        self.ref, self.router = ref, router
        self.tok = ref.tokenizer
        self.marker = user_turn_marker(self.tok)

    @torch.no_grad()
    def unit_queries(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw whitened queries (T, d_k) and unit ones of every prompt token."""
        h, _ = self.ref.lower(torch.tensor([ids]))
        raw = (h[0] - self.router.mean) @ self.router.projection.T
        return raw, torch.nn.functional.normalize(raw, dim=-1)

    def encode(self, prompt, chat: bool, answer: str = "-") -> EncodedFact:
        """A prompt (chat: a question or messages) encoded as the server encodes a fact
        posted without subject: token ids and the guessed subject's span."""
        if not chat:
            return encode_fact(self.tok, {"prompt": prompt, "completion": " " + answer}, 4096)
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return encode_fact(self.tok, {"messages": messages, "answer": answer}, 4096)

    def ends_sentence(self, token: int) -> bool:
        return any(mark in self.tok.decode([token]) for mark in ".?!\n")

    def means(self, fact: EncodedFact, unit: torch.Tensor, leave_out: int
              ) -> dict[str, torch.Tensor]:
        """Unit mean query over the turn being answered ("turn": from the last
        "<|im_start|>user" to the generation prompt's end; a completion: the whole prompt),
        over the user's words only ("content"), and over those outside the guessed subject
        ("relation"), and over those from the last sentence end before the firing token on
        ("sentence"; "relation" where that leaves none), each without the token at
        `leave_out` (the firing one)."""
        ids = fact.prompt_ids
        content = content_positions(fact, self.tok)
        subject = fact.subject_span
        outside = [t for t in content if subject is None or not subject[0] <= t < subject[1]]
        # The sentence holding the firing token: a CounterFact paraphrase opens with an
        # unrelated sentence, a chat question may too.
        opens = [t + 1 for t in content if t < leave_out and self.ends_sentence(ids[t])]
        sentence = [t for t in outside if t >= max(opens, default=0)]
        spans = {"turn": range(scope_start(ids, self.marker), len(ids)), "content": content,
                 "relation": outside or content, "sentence": sentence or outside or content}
        means = {}
        for name, span in spans.items():
            rows = [t for t in span if t != leave_out] or list(span)
            means[name] = torch.nn.functional.normalize(unit[rows].mean(0), dim=-1)
        return means


def fact_keys(tq: TurnQueries, prompt: str, chat: bool, answer: str) -> dict[str, torch.Tensor]:
    """Subject key and the turn-key variants of a fact posted without subject, as the server
    keys it. "*_leaned" (chat facts): the mean of the key asked alone and asked behind the
    trainer's generic earlier exchange (as the subject key leans, model/memorize.py); the
    subject key here is the key asked alone, which fires where the served one does but for
    a few facts."""
    fact = tq.encode(prompt, chat, answer)
    raw, unit = tq.unit_queries(fact.prompt_ids)
    locus = choose_locus(fact, raw[:len(fact.prompt_ids)], tq.tok)
    keys = {"subject": unit[locus], **tq.means(fact, unit, locus)}
    views = history_views(fact, tq.tok, 1, 4096)
    behind = dict(keys)
    if views:
        view = views[0]
        _, view_unit = tq.unit_queries(view.prompt_ids)
        behind = tq.means(view, view_unit, len(view.prompt_ids) - (len(fact.prompt_ids) - locus))
    for name in SPANS:
        keys[f"{name}_leaned"] = torch.nn.functional.normalize(keys[name] + behind[name], dim=-1)
    return keys


def turn_cos(tq: TurnQueries, prompt, chat: bool, keys: dict[str, torch.Tensor]
             ) -> dict[str, float]:
    """cos(turn key, the probe's mean less the token where the subject key fires best), per
    variant."""
    probe = tq.encode(prompt, chat)
    ids = probe.prompt_ids
    _, unit = tq.unit_queries(ids)
    start = scope_start(ids, tq.marker)
    at = start + int((unit[start:] @ keys["subject"]).argmax())
    means = tq.means(probe, unit, at)
    return {v: round(float(means[v.split("_")[0]] @ keys[v]), 5) for v in VARIANTS}


def read_cases(spec: str) -> list[dict]:
    """`path` or `path:lo-hi` (cases lo..hi-1 of the run, by their index in the file)."""
    path, _, span = spec.partition(":")
    cases = [json.loads(line) for line in Path(path).open()]
    if span:
        lo, hi = map(int, span.split("-"))
        cases = cases[lo:hi]
    return cases


def score_run(tq: TurnQueries, spec: str, keys: dict | None = None) -> list[dict]:
    """Per probe: kind, hit as run, base hit, and per fired fact the variants' cosines.
    `keys`, if given, is filled with the keys of the facts that fired."""
    cases = read_cases(spec)
    # Keys of every fact of the run (a probe may fire facts outside the range).
    keys = {} if keys is None else keys
    for case in read_cases(spec.partition(":")[0]):
        rel = next(p for p in case["probes"] if p["kind"] == "reliability")
        keys[case["fact_id"]] = (case["chat"], rel["prompt"], case["target"])
    rows = []
    for case in cases:
        for probe in case["probes"]:
            row = {"case": case["case"], "kind": probe["kind"], "hit": probe["hit"],
                   "base_hit": probe.get("base_hit"), "fired": {}}
            for fact_id in probe.get("mome_facts") or []:
                if fact_id in keys:
                    if isinstance(keys[fact_id], tuple):
                        keys[fact_id] = fact_keys(tq, keys[fact_id][1], keys[fact_id][0],
                                                  keys[fact_id][2])
                    row["fired"][fact_id] = turn_cos(tq, probe["prompt"], case["chat"],
                                                     keys[fact_id])
            rows.append(row)
    return rows


def figures(rows: list[dict], variant: str | None, threshold: float | None) -> dict:
    """Per kind: share of hits with the conjunction on `variant` at `threshold` (None: as
    run), and how many probes the conjunction silenced."""
    out = {}
    for kind in FIRING_KINDS:
        kind_rows = [r for r in rows if r["kind"] == kind]
        if not kind_rows:
            continue
        hits = blocked = partly = unscored = 0
        for r in kind_rows:
            cosines = [c[variant] for c in r["fired"].values()] if variant else []
            silenced = [c < threshold for c in cosines]
            if cosines and all(silenced):
                if kind not in KEEP_BASE and r["base_hit"] is None:
                    unscored += 1
                    continue
                blocked += 1
                hits += True if kind in KEEP_BASE else r["base_hit"]
            else:
                partly += any(silenced)
                hits += r["hit"]
        scored = len(kind_rows) - unscored
        out[kind] = {"n": scored, "hit": round(hits / scored, 3), "blocked": blocked,
                     "partly_blocked": partly, "unscored": unscored}
    return out


def choose_threshold(rows: list[dict], variant: str, keep: float) -> float:
    """The highest threshold under which `keep` of the answered paraphrases stay answered."""
    answered = sorted(max(c[variant] for c in r["fired"].values()) for r in rows
                      if r["kind"] == "paraphrase" and r["hit"] and r["fired"])
    return answered[math.floor(round((1 - keep) * len(answered), 9))]


def table(report: dict) -> str:
    kinds = ("reliability", "paraphrase", "near_miss_relation", "locality",
             "turn_unrelated_after_fact", "turn_fact_after_unrelated")
    lines = ["| second key | keep (tuning) | threshold | rows | " + " | ".join(kinds)
             + " | silenced after a preamble |", "|" + "---|" * (5 + len(kinds))]

    def line(label, keep, threshold, split, f, silenced="-"):
        cells = [f"{f[k]['hit']:.3f} ({f[k]['blocked']})" if k in f else "-" for k in kinds]
        lines.append(f"| {label} | {keep} | {threshold} | {split} | " + " | ".join(cells)
                     + f" | {silenced} |")

    for split in ("tuning", "held_out"):
        line("none (as run)", "-", "-", split, report["as_run"][split])
    for c in report["conjunction"]:
        for split in ("tuning", "held_out"):
            silenced = c["held_out_silenced_after_a_preamble"] if split == "held_out" else "-"
            line(c["variant"], c["keep_tuning_paraphrases"], c["threshold"], split, c[split],
                 "-" if silenced is None else silenced)
    return "\n".join(lines)


# Openings a user may put before the question in the same turn. Not the trainer's context
# prefixes (model/facts.py), so a fact is never scored on a wording it was trained under.
PREAMBLES = ["Quick question.", "I was wondering about something.", "Please answer briefly."]


def preamble_rows(tq: TurnQueries, spec: str, keys: dict) -> list[dict]:
    """Each chat fact asked after a preamble sentence in the same turn: the variants' cosines
    with its own key (the subject key is taken to fire; this asks whether the second key
    would silence the fact for a user who opens politely)."""
    rows = []
    for case in read_cases(spec):
        if not case["chat"] or not isinstance(keys.get(case["fact_id"]), dict):
            continue
        question = next(p for p in case["probes"] if p["kind"] == "reliability")["prompt"]
        for preamble in PREAMBLES:
            rows.append({"case": case["case"], "preamble": preamble,
                         **turn_cos(tq, f"{preamble} {question}", True, keys[case["fact_id"]])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tuning", help="a run's cases.jsonl, or PATH:LO-HI for some cases")
    parser.add_argument("held_out", help="the same, for the rows the threshold is tested on")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.95, 0.9, 0.8])
    args = parser.parse_args()

    cfg = MemoryConfig()
    model_dir = resolve_model_dir(None)
    ref = ReferenceModel(model_dir, cfg.layer, threads=2)
    router = Router.load(ensure_router(model_dir, ref, cfg.layer, cfg.d_k))
    tq = TurnQueries(ref, router)
    held_keys: dict = {}
    scored = {"tuning": score_run(tq, args.tuning),
              "held_out": score_run(tq, args.held_out, held_keys)}
    preambled = preamble_rows(tq, args.held_out, held_keys)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "scores.jsonl").open("w") as f:
        for split, rows in scored.items():
            for row in rows:
                f.write(json.dumps({"split": split, **row}) + "\n")
        for row in preambled:
            f.write(json.dumps({"split": "held_out_preamble", **row}) + "\n")
    report = {"tuning_cases": str(args.tuning), "held_out_cases": str(args.held_out),
              "as_run": {s: figures(rows, None, None) for s, rows in scored.items()},
              "conjunction": []}
    for variant in VARIANTS:
        for keep in args.keep:
            threshold = choose_threshold(scored["tuning"], variant, keep)
            report["conjunction"].append({
                "variant": variant, "keep_tuning_paraphrases": keep,
                "threshold": round(threshold, 4),
                **{s: figures(rows, variant, threshold) for s, rows in scored.items()},
                "held_out_silenced_after_a_preamble": round(
                    sum(r[variant] < threshold for r in preambled) / len(preambled), 3)
                if preambled else None})
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(table(report))  # noqa: T201


if __name__ == "__main__":
    main()
