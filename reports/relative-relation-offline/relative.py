"""A chat fact's second key judged against the bank's other relations, offline (issue 12).

The second key passes where the request's relation words reach the fact's key at an absolute
gate (0.455 through the chat map). The rephrasings it blocks mostly use wordings the fact's
question does not share (reports/METHODS.md, misses-600-799.txt). This study asks whether a
relative test recovers them without passing near misses: below the gate (down to a floor), a
request also passes when the bank relation nearest its words is the fact's own relation
(the fact's relation taken where its question's nearest bank template is at cosine 0.8, or
0.7, or more).

    python reports/relative-relation-offline/relative.py TUNING_CASES HELD_OUT_CASES...

Prints, per case file and per floor, the share of rephrasings and of other-relation near
misses whose second key passes, and the near misses split by whether the bank holds their
template (a bank-based test is easiest on those).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]),
                str(Path(__file__).resolve().parents[1] / "rewordings-offline")]

from rewordings import Lab, read_jsonl  # noqa: E402

from model.relation_map import question_template  # noqa: E402
from model.rewordings import joined_key  # noqa: E402

F = torch.nn.functional
GATE = 0.455
FLOORS = (None, 0.40, 0.35, 0.30, 0.25, 0.20, 0.0)
MATCHES = (0.8, 0.7)


def nearest_relation(lab: Lab, means: torch.Tensor) -> tuple[list[str], np.ndarray]:
    cos = F.normalize(means, dim=-1) @ lab.bank.means.T
    best = cos.argmax(-1)
    return [lab.bank.relation_of[lab.bank.templates[int(b)]] for b in best], \
        cos.max(-1).values.numpy()


def passes(score: torch.Tensor, rel: list[str], rel_own: list[str], known: np.ndarray,
           floor: float | None) -> np.ndarray:
    """The gate, or (from `floor` up) the request's nearest bank relation being the fact's."""
    base = score.numpy() >= GATE
    if floor is None:
        return base
    same = np.array([bool(known[i]) and rel[i] == rel_own[i] for i in range(len(rel))])
    return base | ((score.numpy() >= floor) & same)


def study(lab: Lab, name: str, path: str) -> None:
    triples, subjects = [], []
    for case in read_jsonl(path):
        p = {q["kind"]: q["prompt"] for q in case["probes"] if isinstance(q["prompt"], str)}
        if {"reliability", "paraphrase", "near_miss_relation"} <= p.keys():
            triples.append((p["reliability"], p["paraphrase"], p["near_miss_relation"]))
            subjects.append(case["subject"])
    m = lab.means([q for t in triples for q in t]).reshape(len(triples), 3, -1)
    own, para, near = m[:, 0], m[:, 1], m[:, 2]
    keys = []
    for i, (question, _, _) in enumerate(triples):
        asked = lab.bank.of(question, None, own[i], 3)
        k = joined_key(F.normalize(own[i], dim=-1) * GATE,
                       lab.means(asked) if asked else own[:0], GATE)
        keys.append(F.normalize(k, dim=-1))
    keys = torch.stack(keys)
    s_para, s_near = (keys * F.normalize(para, dim=-1)).sum(-1), (keys * F.normalize(near, dim=-1)).sum(-1)
    rel_own, c_own = nearest_relation(lab, own)
    rel_para, _ = nearest_relation(lab, para)
    rel_near, _ = nearest_relation(lab, near)
    bank_templates = set(lab.bank.templates)
    in_bank = np.array([question_template(n, s) in bank_templates
                        for (_, _, n), s in zip(triples, subjects)])
    print(f"{name}: {len(triples)} cases; near misses whose template the bank holds: "
          f"{int(in_bank.sum())}")
    for match in MATCHES:
        known = c_own >= match
        blocked = s_para.numpy() < GATE
        own_nearest = np.array([bool(known[i]) and rel_para[i] == rel_own[i]
                                for i in range(len(triples))])
        print(f"  own relation known at {match}: rephrasings below the gate {int(blocked.sum())}, "
              f"of them nearest the fact's own bank relation {int((blocked & own_nearest).sum())}")
        for floor in FLOORS:
            pp = passes(s_para, rel_para, rel_own, known, floor)
            pn = passes(s_near, rel_near, rel_own, known, floor)
            print(f"  own relation known at {match}: {int(known.sum()):3d}; floor {floor}: "
                  f"rephrasings pass {pp.mean():.3f} ({int(pp.sum())}), near misses pass "
                  f"{pn.mean():.3f} ({int(pn.sum())}; bank template {int(pn[in_bank].sum())}"
                  f"/{int(in_bank.sum())}, other {int(pn[~in_bank].sum())}/{int((~in_bank).sum())})")


def main() -> None:
    lab = Lab()
    for i, path in enumerate(sys.argv[1:]):
        study(lab, "tuning" if i == 0 else f"held out {Path(path).parent.name}", path)


if __name__ == "__main__":
    main()
