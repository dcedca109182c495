"""Gate recall of the approximate expert index: of the (token, expert) pairs above the gate
that exact search finds, the share the served index finds too. Also search time per batch of
token queries, exact vs. approximate, in the same run.

    python bench/gate_recall.py --experts 1000000 [--facts 200] [--nprobe 8 16 32 64]

The store holds the keys of `--facts` real CounterFact facts (the router's query at each
fact's subject, as memorization computes it) plus synthetic keys that follow the router's
real query distribution: each is the query of a real token from other CounterFact prompts,
moved to a random cosine of 0.80-0.99 from it, so that real traffic's tokens have many keys
near (and above) the gate, the hard case for an approximate index. Queries are every token
of the facts' prompts, of their paraphrases and of unrelated chat prompts. Keys are unit
vectors compared at the base gate (the lowest threshold any expert has), so every pair that
could fire counts. Prints and writes JSON (bench/results/gate_recall.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    SUBJECTS,
    TEMPLATES,
    default_data,
    pairs_above,
    recall,
    synthetic_keys,
    timed_search,
    token_queries,
)

from expert_store import index as ix
from expert_store.config import IndexConfig


def main() -> None:
    from model.backbone import pull_default_model
    from model.config import MemoryConfig
    from model.facts import encode_fact
    from model.memorize import Memorizer
    from model.memory_runtime import load_memory
    from model.reference import ReferenceModel
    from server.memory_setup import ensure_router

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=1_000_000)
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--pool-rows", type=int, default=2000,
                        help="CounterFact rows (after the facts) whose tokens seed the keys")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batch", type=int, default=64, help="tokens per search call")
    parser.add_argument("--data", default=str(default_data()))
    parser.add_argument("--out", default="bench/results/gate_recall.json")
    args = parser.parse_args()

    cfg = MemoryConfig()
    rng = np.random.default_rng(0)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    rows = [r for r in rows if r.get("prompt") and r.get("target_new")]
    facts, pool_rows = rows[:args.facts], rows[args.facts:args.facts + args.pool_rows]

    model_dir = pull_default_model()
    ref = ReferenceModel(model_dir, cfg.layer)
    with tempfile.TemporaryDirectory() as tmp:
        memory = load_memory(Path(tmp) / "store", ensure_router(model_dir, ref, cfg.layer, cfg.d_k),
                             cfg, ref.d_model)
        memorizer = Memorizer(ref, memory, None)
        encoded = [encode_fact(ref.tokenizer, {"prompt": r["prompt"], "completion": r["target_new"],
                                               "subject": r["subject"]}, 512) for r in facts]
        fact_keys = memorizer.keys_for(encoded).numpy().astype(np.float32)
        router = memory.router
        memory.store.close()

    started = time.perf_counter()
    pool = token_queries(ref, router, [r["prompt"] for r in pool_rows])
    chat = [t.format(s) for t in TEMPLATES for s in SUBJECTS]
    queries = {
        "memorized": token_queries(ref, router, [r["prompt"] for r in facts]),
        "paraphrase": token_queries(ref, router, [r["rephrase_prompt"] for r in facts
                                                  if r.get("rephrase_prompt")]),
        "unrelated_chat": token_queries(ref, router, chat),
    }
    n_synthetic = max(0, args.experts - len(fact_keys))
    keys = np.concatenate([fact_keys, synthetic_keys(pool, n_synthetic, rng)])
    ids = np.arange(len(keys), dtype=np.int64)
    print(f"{len(keys)} keys ({len(fact_keys)} real facts), {len(pool)} pool tokens, queries "
          + ", ".join(f"{k} {len(v)}" for k, v in queries.items())
          + f" ({time.perf_counter() - started:.0f} s)")

    build = time.perf_counter()
    exact_index = ix.build_index(keys, ids, keys.shape[1], IndexConfig(kind="flat"))
    exact_build_s = time.perf_counter() - build
    all_queries = np.concatenate(list(queries.values()))
    D_exact, I_exact, exact_ms = timed_search(exact_index, all_queries, cfg.top_k, args.batch)
    del exact_index
    truth = pairs_above(D_exact, I_exact, cfg.gate)
    offsets = np.cumsum([0] + [len(v) for v in queries.values()])
    kinds = {name: (offsets[i], offsets[i + 1]) for i, name in enumerate(queries)}

    build = time.perf_counter()
    ivf = ix.build_index(keys, ids, keys.shape[1], IndexConfig(kind="ivf"))
    ivf_build_s = time.perf_counter() - build
    runs = []
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        D, I, ms = timed_search(ivf, all_queries, cfg.top_k, args.batch)
        found = pairs_above(D, I, cfg.gate)
        by_kind = {}
        for name, (lo, hi) in kinds.items():
            want = {p for p in truth if lo <= p[0] < hi}
            by_kind[name] = {"pairs": len(want), "gate_recall": recall(want, found)}
        share = recall(truth, found)
        extra = len(found - truth)  # pairs above the gate exact top-k did not return
        runs.append({"experts": len(keys), "index": ix.describe(ivf), "nprobe": nprobe,
                     "gate_recall": share, "pairs_above_gate": len(truth),
                     "extra_pairs": extra, "by_query_kind": by_kind,
                     "ms_per_batch": ms, "exact_ms_per_batch": exact_ms,
                     "speedup": exact_ms / ms})
        per_kind = ", ".join(f"{k} {v['gate_recall']:.4f}" for k, v in by_kind.items())
        print(f"N={len(keys):>8} nprobe={nprobe:>3}  gate recall {share:.5f} of "
              f"{len(truth)} pairs ({per_kind})  {ms:7.2f} ms/batch of {args.batch} "
              f"vs exact {exact_ms:7.2f}  x{exact_ms / ms:.1f}")
    report = {"benchmark": "gate_recall", "experts": len(keys), "facts": len(fact_keys),
              "gate": cfg.gate, "top_k": cfg.top_k, "batch": args.batch,
              "queries": {k: len(v) for k, v in queries.items()},
              "build_s": {"flat": exact_build_s, "ivf": ivf_build_s},
              "ivf_cells": int(ivf.nlist), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
