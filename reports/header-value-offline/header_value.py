"""A chat fact's value also added where its answer's first token is predicted (issue 12,
multi-turn; offline, a trial).

Every later-turn miss left is a value miss: the fact's expert fires on the question's words,
and the layers above still follow the earlier reply ("nq: ..." copied, the earlier question
answered). This trial also adds each expert that fires in the turn being answered at the
prompt's last position (the newline after "<|im_start|>assistant"), in training and in
generation alike, so the value reaches the answer's first prediction directly instead of
through attention from the question's words.

    python reports/header-value-offline/header_value.py CASES.jsonl [CASES.jsonl ...]

Takes, from `mome eval` case files, every fact whose later-turn probe missed and every 15th
other fact (every fact with EXP_ALL=1; the first EXP_LIMIT when set); memorizes them one at a time into a
fresh store with the reference model, as chat_cost.py does, with and without the trial
(EXP_CARRY=1; EXP_CARRY=2 adds the experts at every position from there on, the answer's
tokens and generated ones too), and prints per fact whether its question asked after the run's own
unrelated exchange is answered, and whether its
rephrasing is. The reference model applies no second keys (only the engine does), so
near misses cannot be judged here, and rephrasings count firings the engine would block.
Known gap, kept as run: the committed experts' pass gets no carry in a batch where training
drops a view in which nothing fires (the map is built before that drop; `len` guard).
`CARRIED["trained"]` counts the answer position only.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]),
                str(Path(__file__).resolve().parents[1] / "chat-cost-offline")]

from chat_cost import fresh_reference_memory  # noqa: E402

import model.trainer as trainer  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.facts import encode_fact  # noqa: E402
from model.memorize import Memorizer, answer_matches  # noqa: E402
from model.memory_layer import MemoryLayer  # noqa: E402
from model.reference import ReferenceModel, ReferenceServing  # noqa: E402

_carry = threading.local()  # for the next memory call: flat row -> the row it also adds at
CARRIED = {"trained": 0, "served": 0}  # (row, expert) pairs the trial added: not a no-op


def answer_positions(ids: torch.Tensor, header: list[int]) -> list[int]:
    """Per row of (B, T) ids: the last position of the last assistant header, -1 without."""
    out = []
    for row in ids.tolist():
        found = [i for i in range(len(row) - len(header) + 1) if row[i:i + len(header)] == header]
        out.append(found[-1] + len(header) - 1 if found else -1)
    return out


def segments(ids: torch.Tensor, header: list[int]) -> list[tuple[int, int, int]]:
    """Per row of (B, T) ids with an assistant header: (row start, its answer position,
    row end) as flat indices of the (B * T) stream."""
    B, T = ids.shape
    return [(b * T, b * T + p, b * T + T) for b, p in enumerate(answer_positions(ids, header))
            if p > 0]


def install(ref: ReferenceModel, header: list[int], onward: bool) -> None:
    """The trial: each expert firing in a row before its answer position is also added there
    (and, `onward`, at every position after it: the answer's tokens, generated ones too)."""
    gate_pattern, forward = trainer._gate_pattern, MemoryLayer.forward

    def carried_gate(memory, ids, h_routed, keys):
        gate, scope = gate_pattern(memory, ids, h_routed, keys)
        for b, p in enumerate(answer_positions(ids, header)):
            if p > 0:
                fired = gate[b, :p].amax(0)
                upto = gate.shape[1] if onward else p + 1
                CARRIED["trained"] += int((fired > gate[b, p]).sum())
                gate[b, p:upto] = torch.maximum(gate[b, p:upto], fired)
        _carry.plan = ("segments", segments(ids, header))  # for the committed experts' call
        return gate, scope

    def carried_forward(self, h, exclude=None, scope=None, routed=None):
        plan = getattr(_carry, "plan", None)
        _carry.plan = None
        if plan is None:
            return forward(self, h, exclude, scope, routed)
        record, self.record_fired = self.record_fired, True
        delta = forward(self, h, exclude, scope, routed)
        self.record_fired = record
        rows, ids = self.take_fired() or (np.zeros(0, np.int64), np.zeros(0, np.int64))
        pairs = set()
        if plan[0] == "decode":  # one generated token: the prefill's turn experts, onward
            pairs = {(r, e) for r in range(len(h)) for e in plan[1]}
        elif all(end <= len(h) for _, _, end in plan[1]):
            turn = []
            for lo, p, end in plan[1]:
                experts = {int(e) for r, e in zip(rows, ids) if lo <= r < p}
                turn.append(experts)
                pairs |= {(r, e) for r in range(p, end if onward else p + 1) for e in experts}
            _carry.decode = set().union(*turn) if onward and len(turn) == 1 else set()
        pairs -= {(int(r), int(e)) for r, e in zip(rows, ids)}
        CARRIED["served"] += len(pairs)
        if pairs:
            at, which = map(np.array, zip(*sorted(pairs)))
            delta.index_add_(0, torch.from_numpy(at).to(h.device),
                             self.cache.lookup(which).to(h.dtype))
        return delta

    def per_call(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            _carry.plan = None
        elif ids.shape[1] > 1:
            _carry.plan, _carry.decode = ("segments", segments(ids, header)), set()
        else:
            experts = getattr(_carry, "decode", set())
            _carry.plan = ("decode", experts) if experts else None

    trainer._gate_pattern = carried_gate
    MemoryLayer.forward = carried_forward
    ref.model.register_forward_pre_hook(per_call, with_kwargs=True)


def chosen_cases(paths: list[str], every: bool = False) -> list[dict]:
    out = []
    for path in paths:
        for case in map(json.loads, Path(path).read_text().splitlines()):
            probes = {p["kind"]: p for p in case["probes"]}
            later = probes.get("turn_fact_after_unrelated")
            if later and (every or not later["hit"] or case["case"] % 15 == 0):
                out.append({"question": probes["reliability"]["prompt"], "answer": case["target"],
                            "rephrase": probes["paraphrase"]["prompt"],
                            "history": later["prompt"][:2], "missed": not later["hit"]})
    return out


def main() -> None:
    limit = int(os.environ.get("EXP_LIMIT", "0")) or None
    cases = chosen_cases(sys.argv[1:], os.environ.get("EXP_ALL") == "1")[:limit]
    ref, memory = fresh_reference_memory()
    carry = os.environ.get("EXP_CARRY", "0")  # 1: the answer position; 2: it and onward
    if carry != "0":
        install(ref, ref.tokenizer.encode("<|im_start|>assistant\n"), onward=carry == "2")
    memorizer, serving = Memorizer(ref, memory, TrainConfig()), ReferenceServing(ref)
    tally = {"later": 0, "later_was_missed": 0, "missed_before": 0, "rephrased": 0, "steps": 0}
    began = time.perf_counter()
    for i, c in enumerate(cases):
        fact = encode_fact(ref.tokenizer, {"question": c["question"], "answer": c["answer"]}, 512)
        [outcome] = memorizer.memorize([i + 1], [fact], serving)
        behind = encode_fact(ref.tokenizer, {"messages": c["history"] + [
            {"role": "user", "content": c["question"]}], "answer": c["answer"]}, 512)
        asked = encode_fact(ref.tokenizer, {"question": c["rephrase"], "answer": c["answer"]}, 512)
        later_out, rephrased_out = serving.answers([behind, asked])
        later, rephrased = (answer_matches(later_out, c["answer"]),
                            answer_matches(rephrased_out, c["answer"]))
        tally["later"] += later
        tally["later_was_missed"] += later and c["missed"]
        tally["missed_before"] += c["missed"]
        tally["rephrased"] += rephrased
        tally["steps"] += outcome.steps
        print(f"{i}: memorized {outcome.memorized}, {outcome.steps} steps; later "
              f"{later} {later_out!r} (missed in the run: {c['missed']}); rephrasing {rephrased}",
              flush=True)
    print(json.dumps({"carry": carry, "facts": len(cases), **tally, **CARRIED,
                      "seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
    main()
