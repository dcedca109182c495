"""Does a training step cost more against a large store than against an empty one?

A one-off diagnostic for reports/METHODS.md (not a benchmark): the same 8-fact batches
(CounterFact dev rows 3,000 on) are trained against a copy of a memorized store and
against an empty store with the same router, alternating which goes first.
Usage, from the repository root: python reports/counterfact-3000-retry/step_cost.py STORE N
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from model.backbone import default_model_dir
from model.facts import encode_fact
from model.memorize import Memorizer
from model.memory_runtime import load_memory
from model.reference import ReferenceModel
from model.trainer import train_facts
from server.settings import ServerSettings

BATCH = 8


def copies_of(store: Path, work: Path) -> dict[str, Path]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(store, work / "full", ignore=shutil.ignore_patterns("registry*", "lock"))
    shutil.copytree(store / "router", work / "empty" / "router")
    return {"empty": work / "empty", "full": work / "full"}


def main() -> None:
    store, n_batches = Path(sys.argv[1]), int(sys.argv[2])
    settings = ServerSettings()  # the server's own defaults and MOME_* overrides
    cfg, train_cfg = settings.memory_config(), settings.train_config()
    ref = ReferenceModel(default_model_dir(), cfg.layer, threads=2)
    memories = {name: load_memory(path, path / "router", cfg, ref.d_model)
                for name, path in copies_of(store, Path("/tmp/step-cost")).items()}
    with open("../shared/data/counterfact-dev.jsonl") as f:
        rows = [json.loads(line) for line in f][3000:3000 + BATCH * n_batches]
    facts = [encode_fact(ref.tokenizer, {"prompt": r["prompt"], "completion": r["target_new"],
                                         "subject": r["subject"]}, 2048) for r in rows]
    out = {name: dict(experts=len(m.store), train_s=0.0, steps=0, fact_steps=0, add_s=0.0)
           for name, m in memories.items()}
    for b in range(n_batches):
        batch = facts[BATCH * b: BATCH * (b + 1)]
        for name in (("empty", "full") if b % 2 == 0 else ("full", "empty")):
            memory = memories[name]
            ref.attach(memory)
            memorizer = Memorizer(ref, memory, train_cfg)
            keys = memorizer.keys_for(batch)
            start = time.perf_counter()
            result = train_facts(ref, memory, batch, keys, train_cfg,
                                 views=memorizer._views(batch))
            out[name]["train_s"] += time.perf_counter() - start
            out[name]["steps"] += result.steps
            out[name]["fact_steps"] += sum(result.expert_steps)
            start = time.perf_counter()
            memory.store.add(keys.numpy(), result.values.numpy(), np.full(len(batch), 10**9 + b))
            out[name]["add_s"] += time.perf_counter() - start
    for figures in out.values():
        figures["s_per_fact_step"] = round(figures["train_s"] / figures["fact_steps"], 4)
        figures["s_per_batch_step"] = round(figures["train_s"] / figures["steps"], 4)
    print(json.dumps(out, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
