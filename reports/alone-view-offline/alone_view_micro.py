"""What the alone view costs (model/turn_scope.py, ReferenceModel.states_alone and routed),
one thread, zsRE questions (rows 0-9) behind their history view:

    python reports/alone-view-offline/alone_view_micro.py ../shared/data/zsre-dev.jsonl

Prints ms per alone view for 1 and 4 conversations; ms per `routed` over a training batch
(two facts and their history views, whose states the facts' rows lend) against one lower
pass over it; and how far lent states are from computed ones.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]

from model.backbone import pull_default_model  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.facts import encode_fact, history_views  # noqa: E402
from model.reference import ReferenceModel, right_padded  # noqa: E402


def ms_per_call(fn, repeats: int = 20) -> float:
    fn()  # warm: the system turn's keys and values are computed once
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - began) / repeats * 1000, 1)


def main() -> None:
    torch.set_num_threads(1)
    ref = ReferenceModel(pull_default_model(), MemoryConfig().layer)
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()[:10]]
    facts = [encode_fact(ref.tokenizer, {"question": r["src"], "answer": r["alt"]}, 512)
             for r in rows]
    views = [history_views(f, ref.tokenizer, 1, 2048)[0] for f in facts]
    alone = ref.alone_prompts([v.prompt_ids for v in views])
    print("alone prompt lengths", [len(a.ids) for a in alone])
    for n in (1, 4):
        print(f"alone view, {n} conversations: {ms_per_call(lambda n=n: ref.states_alone(alone[:n]))} ms")
    pad = ref.tokenizer.eos_token_id
    batch = right_padded([f.ids for f in facts[:2]] + [v.ids for v in views[:2]], pad)
    h, _ = ref.lower(batch)
    print(f"training batch {tuple(batch.shape)}: lower {ms_per_call(lambda: ref.lower(batch))} ms, "
          f"routed {ms_per_call(lambda: ref.routed(batch, h))} ms")
    lent = ref.routed(batch, h)
    only = right_padded([v.ids for v in views[:2]], pad)
    computed = ref.routed(only, ref.lower(only)[0])
    for j in range(2):
        n = len(views[j].ids)
        print("lent vs computed, max abs diff", float((lent[2 + j, :n] - computed[j, :n]).abs().max()))


if __name__ == "__main__":
    main()
