"""Chat-fact memorization cost offline: zsRE rows memorized one at a time into a fresh store
with the reference model (no vLLM), as the server's worker trains them.

    python reports/chat-cost-offline/chat_cost.py ../shared/data/zsre-dev.jsonl 0 12

Prints per fact the seconds, Adam steps and whether it memorized, then one JSON line (mean
steps, rows forwarded, and how many facts answered their rephrasing and their question asked
after an unrelated exchange, each right after the fact was memorized). The trial that routed
that turn as if asked alone (RoutedAsAlone, reports/METHODS.md) is how the model routes now
and was removed. Steps and rows forwarded do not depend on the machine's load; seconds do. Trials (trial.py):
EXP_TRAIN=name=value,... sets TrainConfig fields. The Gauss-Newton trial in
reports/METHODS.md was a prototype and is not kept.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from model.backbone import pull_default_model  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.facts import encode_fact  # noqa: E402
from model.memorize import Memorizer, answer_matches  # noqa: E402
from model.memory_layer import MemoryLayer  # noqa: E402
from model.memory_runtime import load_memory  # noqa: E402
from model.reference import ReferenceModel, ReferenceServing  # noqa: E402
from server.memory_setup import ensure_router  # noqa: E402


def fresh_reference_memory() -> tuple[ReferenceModel, MemoryLayer]:
    """The reference model with an empty store of its own (a copy of the default router)
    attached, seeded as every offline cost run is."""
    torch.manual_seed(0)
    model_dir, cfg = pull_default_model(), MemoryConfig()
    ref = ReferenceModel(model_dir, cfg.layer)
    router = ensure_router(model_dir, ref, cfg.layer, cfg.d_k)
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(router, tmp / "router")
    memory = load_memory(tmp / "store", tmp / "router", cfg, ref.d_model)
    ref.attach(memory)
    return ref, memory


def main() -> None:
    import trial  # the trial settings and the rows counter

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ref, memory = fresh_reference_memory()
    memorizer = Memorizer(ref, memory, trial.train_config())
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()][start:start + n]
    serving = ReferenceServing(ref)
    # The fact asked after an unrelated exchange, as `mome eval` builds it: the row's
    # locality question and the base model's 16-token reply to it (store still empty).
    histories = []
    for row in rows:
        unrelated = encode_fact(ref.tokenizer, {"question": row["loc"], "answer": "-"}, 512)
        reply = ref.tokenizer.decode(ref.generate(unrelated.prompt_ids, 16)).strip()
        histories.append([{"role": "user", "content": row["loc"]},
                          {"role": "assistant", "content": reply}])
    seconds, steps, memorized, rephrased, later = [], [], 0, 0, 0
    for i, row in enumerate(rows):
        fact = encode_fact(ref.tokenizer, {"question": row["src"], "answer": row["alt"]}, 512)
        began = time.perf_counter()
        [outcome] = memorizer.memorize([i + 1], [fact], serving)
        seconds.append(time.perf_counter() - began)
        steps.append(outcome.steps)
        memorized += outcome.memorized
        asked = encode_fact(ref.tokenizer, {"question": row["rephrase"], "answer": row["alt"]}, 512)
        rephrased += answer_matches(serving.answers([asked])[0], row["alt"])
        behind = encode_fact(ref.tokenizer, {"messages": histories[i] + [
            {"role": "user", "content": row["src"]}], "answer": row["alt"]}, 512)
        later += answer_matches(serving.answers([behind])[0], row["alt"])
        print(f"fact {start + i}: {seconds[-1]:.2f} s, {outcome.steps} steps, "
              f"memorized {outcome.memorized}", flush=True)
    print(json.dumps({"rows": f"{start}-{start + n - 1}", "s_per_fact": sum(seconds) / n,
                      "steps": steps, "mean_steps": sum(steps) / n,
                      "rows_forwarded": trial.ROWS_FORWARDED[0], "memorized": memorized,
                      "rephrased": rephrased, "after_unrelated": later}))


if __name__ == "__main__":
    main()
