"""Training recipes for the relation map, scored offline (issue 12).

The relation map (model/relation_map.py) was trained on one pair per zsRE bank row: the
row's question and its rephrasing. Held out, the second key it compares through is what most
missed rephrasings lack (reports/rewordings-offline, `misses`). Here other training sets are
tried, each fitted by the server's own `fit_map` and scored the way `projection.py --served`
scores the served map (the threshold keeps 90% of the tuning run's answered rephrasings):

- `base`: the served recipe (zsRE rows 100-399, the row's rephrasing);
- `grouped1`, `grouped3`: also up to 1 or 3 other templates of the row's relation (grouped
  from the bank's own rows) filled with the row's subject;
- `counterfact`: base plus CounterFact rows 1000-1999 (never in the 1,000-fact runs), the
  prompt and its rephrasing's sentence that names the subject;
- `grouped3+counterfact`: both;
- `counterfact-completion`: the CounterFact rows alone, their means taken as completion
  prompts' (the server's completion facts), the map completions would compare through;
- `zsre+counterfact-completion`: the zsRE rows as chat questions and the CounterFact rows
  as completion prompts, one map for both kinds.

Usage, from the repository root (TUNE and HELD as in projection.py; CF: counterfact-dev.jsonl):
    python reports/relation-map-offline/recipes.py CF TUNE HELD OUT_DIR TAG
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "relation-bank-offline"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bank import TurnQueries  # noqa: E402
from projection import served_score_run, write_report  # noqa: E402

from model.backbone import resolve_model_dir  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.facts import choose_locus, encode_fact  # noqa: E402
from model.reference import ReferenceModel  # noqa: E402
from model.relation_key import relation_mean  # noqa: E402
from model.relation_map import (  # noqa: E402
    fit_map,
    question_means,
    question_template,
    read_rows,
    relation_templates,
    training_questions,
)
from model.router import Router  # noqa: E402
from model.turn_scope import user_turn_marker  # noqa: E402
from server.memory_setup import ensure_router  # noqa: E402

COUNTERFACT_ROWS = range(1000, 2000)


def counterfact_rows(path: str) -> list[dict]:
    """CounterFact rows as the map's rows: (src, rephrase, subject), the rephrasing cut to
    the sentence naming the subject (many open with unrelated text)."""
    lines = Path(path).read_text().splitlines()
    out = []
    for i in COUNTERFACT_ROWS:
        row = json.loads(lines[i])
        s, rephrase = row.get("subject") or "", row.get("rephrase_prompt") or ""
        if not s or s not in rephrase or s not in row.get("prompt", ""):
            continue
        at = rephrase.index(s)
        start = max(rephrase.rfind(". ", 0, at), rephrase.rfind("? ", 0, at))
        out.append({"src": row["prompt"], "rephrase": rephrase[start + 2 if start >= 0 else 0:],
                    "subject": s})
    return out


def grouped_questions(rows: list[dict], extra: int) -> list[tuple[str, str, list[str]]]:
    """The served triples, plus up to `extra` per row whose positive is another template of
    the row's relation (the most used first) filled with its subject."""
    bank = relation_templates(rows)
    members = bank.by_use()
    out = []
    for (row, template), triple in zip(bank.usable, training_questions(rows)):
        out.append(triple)
        asked = {template, question_template(row["rephrase"], row["subject"])}
        own = members[bank.relation_of[template]]
        out += [(row["src"], t.replace("{}", row["subject"], 1), triple[2])
                for t in own if t not in asked][:extra]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("counterfact", "tuning", "held_out", "out_dir", "tag"):
        parser.add_argument(name)
    args = parser.parse_args()
    cfg = MemoryConfig()
    model_dir = resolve_model_dir(None)
    ref = ReferenceModel(model_dir, cfg.layer, threads=2)
    router = Router.load(ensure_router(model_dir, ref, cfg.layer, cfg.d_k))
    memo: dict[tuple[bool, str], torch.Tensor] = {}

    completions: set[str] = set()  # texts whose means are taken as completion prompts'
    marker = user_turn_marker(ref.tokenizer)

    def completion_mean(prompt: str) -> torch.Tensor:
        fact = encode_fact(ref.tokenizer, {"prompt": prompt, "completion": " -"}, 1 << 16)
        with torch.no_grad():
            h, _ = ref.lower(torch.tensor([fact.prompt_ids]))
        raw = router.whiten(h[0])
        mean = relation_mean(fact.prompt_ids, raw, choose_locus(fact, raw, ref.tokenizer),
                             ref.tokenizer, marker)
        return mean if mean is not None else torch.zeros(router.d_k)

    def means_of(questions: list[str]):
        todo = [q for q in dict.fromkeys(questions) if (q in completions, q) not in memo]
        chat = [q for q in todo if q not in completions]
        if chat:
            memo.update(((False, q), m) for q, m in zip(chat, question_means(ref, router, chat)))
        memo.update(((True, q), completion_mean(q)) for q in todo if q in completions)
        return torch.stack([memo[(q in completions, q)] for q in questions])

    zsre, cf = read_rows(), counterfact_rows(args.counterfact)
    cf_triples = training_questions(cf)
    recipes = {"base": training_questions(zsre),
               "grouped1": grouped_questions(zsre, 1),
               "grouped3": grouped_questions(zsre, 3),
               "counterfact": training_questions(zsre) + cf_triples,
               "grouped3+counterfact": grouped_questions(zsre, 3) + cf_triples,
               "counterfact-completion": cf_triples,
               "zsre+counterfact-completion": training_questions(zsre) + cf_triples}
    as_completions = {"counterfact-completion", "zsre+counterfact-completion"}
    views = {}
    for name, triples in recipes.items():
        print(f"{name}: {len(triples)} training pairs", flush=True)  # noqa: T201
        completions.clear()
        if name in as_completions:
            completions.update(q for a, p, negs in cf_triples for q in (a, p, *negs))
        views[name] = router.with_relation(fit_map(means_of, triples)).relation_view
    probe = torch.randn(8, cfg.d_k)  # the base recipe must be the served map
    print("served map reproduced:", torch.allclose(views["base"](probe), router.relation_view(probe),  # noqa: T201
                                                   atol=1e-5))
    scored = {"tuning": served_score_run(TurnQueries(ref, router), args.tuning, views),
              "held_out": served_score_run(TurnQueries(ref, router), args.held_out, views)}
    write_report(argparse.Namespace(out_dir=args.out_dir, tag=args.tag), scored, list(views),
                 {"router": router.fingerprint(), "counterfact_rows": [COUNTERFACT_ROWS.start,
                                                                       COUNTERFACT_ROWS.stop],
                  "pairs": {n: len(t) for n, t in recipes.items()}})


if __name__ == "__main__":
    main()
