"""Expert store at scale: build, memory, search latency and recall, cache hit rate, writes/s.

    python bench/store.py --experts 1000000 [--d-k 128] [--value-dim 576]

Prints and writes JSON (bench/results/store.json). Keys are drawn from a Gaussian mixture
(hidden states cluster by entity type); values are one vector of the backbone's width.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from expert_store import index as ix
from expert_store.config import IndexConfig, StoreConfig
from expert_store.device_cache import DeviceCache
from expert_store.store import ExpertStore


def mixture(n: int, d: int, centres: np.ndarray, rng, spread: float = 0.6) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def latency_ms(index, xq_pool: np.ndarray, batch: int, k: int, repeats: int) -> dict:
    rng = np.random.default_rng(batch)
    times = []
    ix.search(index, xq_pool[:batch], k)  # warm-up, left out
    for _ in range(repeats):
        xq = xq_pool[rng.integers(0, len(xq_pool), batch)]
        start = time.perf_counter()
        ix.search(index, xq, k)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=1_000_000)
    parser.add_argument("--d-k", type=int, default=128)
    parser.add_argument("--value-dim", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--exact-batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--spread", type=float, default=0.6,
                        help="noise around the mixture centres (larger: harder for IVF)")
    parser.add_argument("--batch-write", type=int, default=20_000)
    parser.add_argument("--cache-slots", type=int, default=65_536)
    parser.add_argument("--dir", default=None, help="where to build the store (default: tmp)")
    parser.add_argument("--out", default="bench/results/store.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, args.d_k)).astype(np.float32)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="mome-store-bench-"))
    cfg = StoreConfig(d_k=args.d_k, value_shape=(args.value_dim,), initial_capacity=1 << 16)
    report: dict = {"benchmark": "store", "experts": args.experts, "d_k": args.d_k,
                    "value_dim": args.value_dim, "k": args.k, "key_spread": args.spread}

    # ---- build: bulk writes --------------------------------------------------------------
    rss_before = rss_gib()
    store = ExpertStore.open(workdir / "store", cfg)
    start = time.perf_counter()
    for offset in range(0, args.experts, args.batch_write):
        n = min(args.batch_write, args.experts - offset)
        keys = mixture(n, args.d_k, centres, rng, args.spread)
        values = rng.standard_normal((n, args.value_dim), dtype=np.float32)
        store.add(keys, values, np.arange(offset, offset + n) + 1)
    store.checkpoint()
    build_s = time.perf_counter() - start
    report["build_seconds"] = build_s
    report["bulk_writes_per_s"] = args.experts / build_s
    disk = sum(f.stat().st_size for f in (workdir / "store").iterdir())
    raw = (args.d_k + args.value_dim) * 4
    report["bytes_per_expert_disk"] = disk / args.experts
    report["bytes_per_expert_raw_params"] = raw
    print(f"build {args.experts:,} experts: {build_s:.1f} s ({args.experts / build_s:,.0f}/s); "
          f"{disk / args.experts:.0f} B/expert on disk vs {raw} B raw")

    # ---- reopen: the cost of a restart (WAL replay, index rebuild) ------------------------
    store.close()
    start = time.perf_counter()
    store = ExpertStore.open(workdir / "store")
    report["reopen_seconds"] = time.perf_counter() - start
    report["resident_gib_after_reopen"] = rss_gib() - rss_before
    print(f"reopen {report['reopen_seconds']:.1f} s; resident {report['resident_gib_after_reopen']:.2f} GiB")

    # ---- search: exact vs approximate -----------------------------------------------------
    xq_pool = mixture(4096, args.d_k, centres, rng, args.spread)
    exact = store._index
    start = time.perf_counter()
    keys = store.read_keys(store.allocated_ids())
    ivf = ix.build_index(keys, store.allocated_ids(), args.d_k,
                         IndexConfig(kind="ivf"))
    report["ivf_build_seconds"] = time.perf_counter() - start
    del keys
    _, I_exact = ix.search(exact, xq_pool[:256], args.k)
    _, I_self = ix.search(ivf, store.read_keys(np.arange(1000)), 1)
    report["ivf_self_hit_rate"] = float((I_self[:, 0] == np.arange(1000)).mean())
    # What the memory layer needs: a query close to a stored key (cosine ~0.9, above the
    # gate) must find that key. Noise of norm 0.48 on unit keys gives cosine ~0.9.
    noise = rng.standard_normal((1000, args.d_k)).astype(np.float32)
    noise *= 0.48 / np.linalg.norm(noise, axis=1, keepdims=True)
    near = store.read_keys(np.arange(1000)) + noise
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    report["search"] = {"exact": {}}
    for batch in args.exact_batches:
        stats = latency_ms(exact, xq_pool, batch, args.k, 30 if batch == 256 else 100)
        report["search"]["exact"][str(batch)] = stats
        print(f"search exact        batch {batch:3d} k={args.k}: p50 {stats['p50_ms']:7.2f} ms "
              f"p99 {stats['p99_ms']:7.2f} ms")
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        _, I_ivf = ix.search(ivf, xq_pool[:256], args.k)
        _, I_near = ix.search(ivf, near, args.k)
        row = {"recall_at_k": ix.recall_at_k(I_ivf, I_exact),
               "near_key_found": float((I_near == np.arange(1000)[:, None]).any(1).mean())}
        for batch in (1, 32, 256):
            row[str(batch)] = stats = latency_ms(ivf, xq_pool, batch, args.k, 200)
            print(f"search ivf nprobe {nprobe:3d} batch {batch:3d} k={args.k}: "
                  f"p50 {stats['p50_ms']:7.2f} ms p99 {stats['p99_ms']:7.2f} ms")
        report["search"][f"ivf_nprobe{nprobe}"] = row
        print(f"  recall@{args.k} {row['recall_at_k']:.3f}; a key at cosine ~0.9 found "
              f"{row['near_key_found']:.3f}")
    print(f"ivf: {ivf.nlist} cells, built in {report['ivf_build_seconds']:.1f} s; "
          f"self-hit {report['ivf_self_hit_rate']:.3f}")

    # ---- device cache under Zipf access ---------------------------------------------------
    cache = DeviceCache(store, args.cache_slots, device="cuda" if torch.cuda.is_available() else "cpu")
    ids = (rng.zipf(1.2, 200_000) - 1) % args.experts
    perm = rng.permutation(args.experts)  # popular experts are spread over the table
    for chunk in np.array_split(perm[ids], 200):
        cache.lookup(chunk[:256])
    report["device_cache"] = {"slots": args.cache_slots, "zipf_a": 1.2,
                              "hit_rate": cache.stats.hit_rate, "evictions": cache.stats.evictions}
    print(f"device cache {args.cache_slots:,} slots, Zipf(1.2): hit rate {cache.stats.hit_rate:.3f}")

    # ---- committed single writes (one fsync each) -----------------------------------------
    start = time.perf_counter()
    n_single = 300
    for i in range(n_single):
        store.add(mixture(1, args.d_k, centres, rng), np.zeros((1, args.value_dim), np.float32),
                  10**9 + i)
    report["single_writes_per_s"] = n_single / (time.perf_counter() - start)
    print(f"single committed writes: {report['single_writes_per_s']:.0f}/s")
    report["resident_gib_end"] = rss_gib() - rss_before
    store.close()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    if not args.dir:
        import shutil

        shutil.rmtree(workdir)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
