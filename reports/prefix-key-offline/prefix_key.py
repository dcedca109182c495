"""A completion fact's key leaned toward its locus behind context prefixes (issue 12, offline).

CounterFact rephrasings often open with unrelated text ("Regarding vitamin supplements, ...
X's mother tongue is"), and in 93 to 113 of 200 rephrasings missed in the 1,000-fact runs
no expert fired at all. ROME/MEMIT key an edit on the subject's last token averaged over
prefixes; here the served key (the locus asked alone) leans toward the same locus behind
the trainer's context prefixes (model/facts.py CONTEXT_PREFIXES), as chat keys lean behind
an earlier exchange, and each key's firing is counted at the global gate:

- on its fact's rephrasing (best over the rephrasing's content tokens),
- on its row's locality prompt (another subject, often the same relation),
- on the other rows' prompts (other facts of the run: firing there is interference).

Usage, from the repository root:
    python reports/prefix-key-offline/prefix_key.py ../shared/data/counterfact-dev.jsonl 0-200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.backbone import resolve_model_dir  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.expert_gates import lean_toward  # noqa: E402
from model.facts import CONTEXT_PREFIXES, choose_locus, content_positions, encode_fact  # noqa: E402
from model.reference import ReferenceModel  # noqa: E402
from model.router import Router  # noqa: E402
from server.memory_setup import ensure_router  # noqa: E402

F = torch.nn.functional


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("rows", help="LO-HI, file rows")
    parser.add_argument("--subject", action="store_true", help="key on the given subject")
    args = parser.parse_args()
    lo, hi = map(int, args.rows.split("-"))
    lines = Path(args.data).read_text().splitlines()[lo:hi]
    rows = [r for r in map(json.loads, lines) if r.get("target_new", "").strip()]
    cfg = MemoryConfig()
    model_dir = resolve_model_dir(None)
    ref = ReferenceModel(model_dir, cfg.layer, threads=2)
    router = Router.load(ensure_router(model_dir, ref, cfg.layer, cfg.d_k))
    tok = ref.tokenizer

    def queries(prompt: str, subject: str | None = None):
        fact = encode_fact(tok, {"prompt": prompt, "completion": " x", "subject": subject}, 2048)
        with torch.no_grad():
            h, _ = ref.lower(torch.tensor([fact.prompt_ids]))
        return fact, router.whiten(h[0])

    alone, behind, probes = [], [], []
    for row in rows:
        fact, raw = queries(row["prompt"], row["subject"] if args.subject else None)
        locus = choose_locus(fact, raw, tok)
        alone.append(F.normalize(raw[locus], dim=-1))
        tail = len(fact.prompt_ids) - locus
        at = []
        for prefix in CONTEXT_PREFIXES:
            pf, praw = queries(f"{prefix} {row['prompt']}")
            at.append(F.normalize(praw[len(pf.prompt_ids) - tail], dim=-1))
        behind.append(F.normalize(torch.stack(at).mean(0), dim=-1))
        unit = []
        for text in (row["rephrase_prompt"], row["locality_prompt"], row["prompt"]):
            f, r = queries(text)
            unit.append(F.normalize(r[content_positions(f, tok)], dim=-1))
        probes.append(unit)
    alone, behind = torch.stack(alone), torch.stack(behind)
    print(f"{len(rows)} facts, subject given: {args.subject}; cos(alone, behind prefixes) "  # noqa: T201
          f"mean {float((alone * behind).sum(-1).mean()):.3f}")
    for floor in (None, 0.98, 0.97, 0.95, 0.93):
        keys = alone if floor is None else lean_toward(alone, behind, floor)
        for gate in (0.90, 0.93, 0.95):
            para = sum(float((p[0] @ k).max()) >= gate for p, k in zip(probes, keys))
            local = sum(float((p[1] @ k).max()) >= gate for p, k in zip(probes, keys))
            other = sum(float((probes[j][2] @ keys[i]).max()) >= gate
                        for i in range(len(rows)) for j in range(len(rows)) if i != j)
            print(f"lean floor {floor}, gate {gate:.2f}: fires on {para} of {len(rows)} "  # noqa: T201
                  f"rephrasings, {local} locality prompts, {other} other facts' prompts")


if __name__ == "__main__":
    main()
