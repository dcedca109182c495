"""A contrastive projection of relation means, scored offline (issue 12, PENME-style lever).

The second key compares relation means (the mean router query over a question's words
outside its subject) by cosine. Here a linear map W is trained on bank rows only, so that a
row's question and its rephrasing land close (positive) and the same subject asked by
templates of other relations (filled by rule from the bank, as the evaluator builds its
near misses from its own rows) lands far (hard negatives), InfoNCE with in-batch negatives.
Then the served rule is scored on finished runs as bank.py scores it, with cos(W own, W
probe) in place of cos(own, probe). The threshold and the training length are chosen on the
tuning run.

Usage, from the repository root:
    python reports/relation-bank-offline/projection.py DATA BANK_ROWS TUNING HELD_OUT OUT
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bank import (  # noqa: E402
    Bank,
    ProbeMeans,
    TurnQueries,
    choose_threshold,
    cut,
    figures,
    load_bank_rows,
    relation_key,
    score_fired,
)

from model.backbone import resolve_model_dir  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.facts import choose_locus  # noqa: E402
from model.reference import ReferenceModel  # noqa: E402
from model.relation_key import relation_mean  # noqa: E402
from model.router import Router  # noqa: E402
from model.turn_scope import scope_start  # noqa: E402
from server.memory_setup import ensure_router  # noqa: E402

NEGATIVES = 4


def training_triples(tq: TurnQueries, bank: Bank, rows: list[dict], seed: int = 0):
    """(anchor, positive, negatives (k, d)) relation means per usable bank row."""
    rng = random.Random(seed)
    relations = sorted(bank.members)
    out = []
    for row in rows:
        s = row["subject"]
        q, p = cut(row["src"], s), cut(row.get("rephrase") or "", s)
        if not q or not p:
            continue
        own = bank.group[" ".join(q.lower().split())]
        others = [g for g in rng.sample(relations, NEGATIVES + 1) if g != own][:NEGATIVES]
        negatives = [bank.text[bank.members[g][0]].replace("{}", s, 1) for g in others]
        means = [relation_key(tq, x)[0] for x in (row["src"], row["rephrase"], *negatives)]
        out.append((means[0], means[1], torch.stack(means[2:])))
    return out


def train(triples, dim: int, epochs: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    d = triples[0][0].shape[0]
    W = torch.nn.Parameter(torch.eye(d)[:dim].clone())
    opt = torch.optim.Adam([W], lr=1e-2)
    a = torch.stack([t[0] for t in triples])
    p = torch.stack([t[1] for t in triples])
    n = torch.stack([t[2] for t in triples])  # (N, k, d)
    for _ in range(epochs):
        for idx in torch.randperm(len(a)).split(64):
            za = torch.nn.functional.normalize(a[idx] @ W.T, dim=-1)
            zp = torch.nn.functional.normalize(p[idx] @ W.T, dim=-1)
            zn = torch.nn.functional.normalize(n[idx] @ W.T, dim=-1)
            pos = (za * zp).sum(-1, keepdim=True)
            hard = torch.einsum("bd,bkd->bk", za, zn)
            batch = za @ zp.T
            batch = batch.masked_fill(torch.eye(len(idx), dtype=torch.bool), -2)
            logits = torch.cat([pos, hard, batch], 1) / 0.1
            loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach()


def score_run(tq: TurnQueries, spec: str, Ws: dict[str, torch.Tensor]) -> list[dict]:
    probe_mean = ProbeMeans(tq)
    keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(question: str, prompt, chat: bool) -> dict:
        if question not in keys:
            keys[question] = relation_key(tq, question, chat)
        own, subject_key = keys[question]
        mean = probe_mean(prompt, subject_key, chat)
        return {name: float(torch.nn.functional.normalize(own @ W.T, dim=-1)
                            @ torch.nn.functional.normalize(mean @ W.T, dim=-1))
                for name, W in Ws.items()}

    return score_fired(spec, score)


def served_score_run(tq: TurnQueries, spec: str, views: dict) -> list[dict]:
    """As `score_run`, with the means taken by the server's own code (model/relation_key.py)
    and compared through each of `views` (name -> means as unit second keys, e.g. a router's
    `relation_view`)."""
    cache: dict = {}

    def means(prompt, chat: bool, subject_key=None):
        key = (json.dumps(prompt), None if subject_key is None else id(subject_key))
        if key not in cache:
            enc = tq.encode(prompt, chat)
            ids = enc.prompt_ids
            raw, unit = tq.unit_queries(ids)
            if subject_key is None:
                locus = choose_locus(enc, raw[:len(ids)], tq.tok)
            else:
                start = scope_start(ids, tq.marker)
                locus = start + int((unit[start:] @ subject_key).argmax())
            mean = relation_mean(ids, raw, locus, tq.tok, tq.marker)
            cache[key] = (mean if mean is not None else torch.zeros(raw.shape[-1]), unit[locus])
        return cache[key]

    def score(question: str, prompt, chat: bool) -> dict:
        own, subject_key = means(question, chat)
        probe, _ = means(prompt, chat, subject_key)
        return {name: float(view(own) @ view(probe)) for name, view in views.items()}

    return score_fired(spec, score)


def served_views(router) -> dict:
    """The served means compared raw ("served_raw") and through the router's map ("served_map")."""
    return {"served_raw": lambda m: torch.nn.functional.normalize(m, dim=-1),
            "served_map": router.relation_view}


def write_report(args, scored: dict[str, list[dict]], variants, about: dict) -> None:
    """Scores and, per variant and share of tuning rephrasings kept, the tuning-chosen
    threshold's figures on both runs (printed and in OUT/TAG-report.json)."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{args.tag}-scores.jsonl").open("w") as f:
        for split, split_rows in scored.items():
            for row in split_rows:
                f.write(json.dumps({"split": split, **row}) + "\n")
    report = {"command": " ".join(sys.argv), **about, "variants": []}
    for name in variants:
        for keep in (0.95, 0.9, 0.85):
            t = choose_threshold(scored["tuning"], name, keep)
            f = {s: figures(r, name, t) for s, r in scored.items()}
            report["variants"].append({"variant": name, "keep": keep, "threshold": round(t, 4), **f})
            print(name, keep, round(t, 3), *(  # noqa: T201
                f"{s}: para {f[s]['paraphrase']['hit']:.3f} nm {f[s]['near_miss_relation']['hit']:.3f}"
                f" rel {f[s]['reliability']['hit']:.3f}" for s in f))
    (out / f"{args.tag}-report.json").write_text(json.dumps(report, indent=2))


def served_main(args) -> None:
    """Thresholds for the server's second keys with and without the relation map."""
    cfg = MemoryConfig()
    model_dir = resolve_model_dir(None)
    ref = ReferenceModel(model_dir, cfg.layer, threads=2)
    router = Router.load(ensure_router(model_dir, ref, cfg.layer, cfg.d_k))
    tq = TurnQueries(ref, router)
    scored = {"tuning": served_score_run(tq, args.tuning, served_views(router)),
              "held_out": served_score_run(tq, args.held_out, served_views(router))}
    write_report(args, scored, ("served_raw", "served_map"), {"router": router.fingerprint()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("data", "bank_rows", "tuning", "held_out", "out_dir"):
        parser.add_argument(name)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 20, 60])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tag", default="projection", help="output file names' prefix")
    parser.add_argument("--served", action="store_true",
                        help="score the server's own means and its router's map instead")
    args = parser.parse_args()
    if args.served:
        return served_main(args)
    tq, rows = load_bank_rows(args.data, args.bank_rows)
    bank = Bank(tq, rows)
    triples = training_triples(tq, bank, rows)
    d = triples[0][0].shape[0]
    Ws = {"identity": torch.eye(d)}
    for dim in args.dims:
        for epochs in args.epochs:
            for seed in args.seeds:
                name = f"w{dim}_e{epochs}" + (f"_s{seed}" if seed else "")
                Ws[name] = train(triples, dim, epochs, seed)
    scored = {"tuning": score_run(tq, args.tuning, Ws), "held_out": score_run(tq, args.held_out, Ws)}
    write_report(args, scored, list(Ws), {"bank_rows": args.bank_rows, "triples": len(triples)})


if __name__ == "__main__":
    main()
