"""Trial (reports/METHODS.md, not kept): completion facts trained with the layers above the
memory layer in a bf16 copy, then checked in fp32 (one forward); a fact that misses the margin
there trains on in fp32. One fact at a time into a fresh store, with the reference model.

    python reports/train-step-offline/bf16_trial.py START N fp32|bf16

Prints one JSON line: seconds (keys and training), Adam steps, fp32 steps after the bf16
ones, and how many facts then answer their prompt and their rephrasing (greedy, fp32).
"""

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model.backbone import default_model_dir  # noqa: E402
from model.facts import encode_fact  # noqa: E402
from model.memorize import Memorizer, answer_matches  # noqa: E402
from model.memory_runtime import load_memory  # noqa: E402
from model.reference import ReferenceModel  # noqa: E402
from model.trainer import train_facts  # noqa: E402
from server.memory_setup import default_router_dir  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "counterfact-dev.jsonl"


def _bf16(cached):
    positions, (cos, sin) = cached
    return positions, (cos.bfloat16(), sin.bfloat16())


class Bf16Upper:
    """Switches `ref`'s training passes above the memory layer to a bf16 copy and back."""

    def __init__(self, ref: ReferenceModel):
        self.ref = ref
        self.copy = copy.copy(ref)
        self.copy.model = copy.deepcopy(ref.model).to(torch.bfloat16)
        self.copy.layers = self.copy.model.model.layers

    def on(self) -> None:
        b = self.copy
        self.ref.upper_prefix = lambda h, cached, split: ReferenceModel.upper_prefix(
            b, h.bfloat16(), _bf16(cached), split)
        self.ref.upper_suffix = lambda h, cached, split, prefix, at=None: ReferenceModel.upper_suffix(
            b, h.bfloat16(), _bf16(cached), split, prefix, at=at).float()
        self.ref.upper = lambda h, cached, at=None: ReferenceModel.upper(
            b, h.bfloat16(), _bf16(cached), at=at).float()

    def off(self) -> None:
        for name in ("upper_prefix", "upper_suffix", "upper"):
            del self.ref.__dict__[name]


def answers(ref: ReferenceModel, ids: list[int], fact) -> bool:
    return answer_matches(ref.tokenizer.decode(ref.generate(ids, len(fact.answer_ids) + 2)),
                          fact.answer_text)


def main() -> None:
    start, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    settings = ServerSettings()
    cfg, train_cfg = settings.memory_config(), settings.train_config()
    ref = ReferenceModel(default_model_dir(), cfg.layer, threads=1)
    memory = load_memory(Path(tempfile.mkdtemp()) / "store",
                         default_router_dir(default_model_dir(), cfg.layer, cfg.d_k), cfg, ref.d_model)
    ref.attach(memory)
    memorizer, bf16 = Memorizer(ref, memory, train_cfg), Bf16Upper(ref)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][start:start + n]
    out = dict(mode=mode, facts=0, seconds=0.0, steps=0, fp32_steps=0, passed_fp32_check=0,
               answered=0, rephrased=0)
    for i, row in enumerate(rows):
        fact = encode_fact(ref.tokenizer, {"prompt": row["prompt"], "completion": row["target_new"]},
                           2048)
        began = time.perf_counter()
        keys = memorizer.fact_keys([fact])
        if mode == "bf16":
            bf16.on()
            result = train_facts(ref, memory, [fact], keys, train_cfg)
            bf16.off()
            check = train_facts(ref, memory, [fact], keys, train_cfg, init_values=result.values,
                                max_steps=1)
            passed = check.margin[0] >= train_cfg.margin
            out["passed_fp32_check"] += passed
            values = result.values
            if not passed:
                more = train_facts(ref, memory, [fact], keys, train_cfg, init_values=values)
                values, out["fp32_steps"] = more.values, out["fp32_steps"] + more.steps
        else:
            result = train_facts(ref, memory, [fact], keys, train_cfg)
            values = result.values
        out["seconds"] += time.perf_counter() - began
        out["steps"] += result.steps
        out["facts"] += 1
        memory.store.add(keys.numpy(), values.numpy(), np.array([i + 1]))
        memory.refresh()
        out["answered"] += answers(ref, fact.prompt_ids, fact)
        out["rephrased"] += answers(ref, ref.tokenizer(row["rephrase_prompt"]).input_ids, fact)
    out["s_per_fact"] = out["seconds"] / out["facts"]
    print(json.dumps(out), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
