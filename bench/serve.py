"""Serving throughput with the memory layer, as a ratio to the plain server in the same run.

    python bench/serve.py [--experts 10000 1000000] [--real-facts 200]
                          [--concurrency 1 8 32] [--num-prompts 32] [--output-len 32]
                          [--provenance-off] [--interleave] [--repeats 3] [--nprobe 32 16]

1. The plain server (MOME_MEMORY=false), and vLLM's offline LLM.generate on the same prompts.
   The plain server runs again at the end: ratios divide by the mean of its two runs, and
   their drift is reported (this machine is shared; each level is also the median of
   `--repeats` passes).
2. A store of `--real-facts` CounterFact facts memorized through the admin API; served, it
   gives the facts' reliability and their locality prompts' outputs (the reference below).
3. For each `--experts N`: that store plus N - real-facts synthetic experts whose keys follow
   the router's real query distribution (real token queries of other CounterFact prompts and
   of the chat prompts served here, moved to cosine 0.80-0.99: many sit near the gate on real
   traffic) and whose values are zero, so they can change the facts' answers only through
   retrieval (crowding the top-k, an approximate index missing a key), which is what is
   measured. The server picks its index as configured (MOME_MEMORY_INDEX, default auto: IVF
   from 100,000 experts). Per run: tokens/s and TTFT at each concurrency as a ratio to the
   plain server, gate recall of the served index on real prompts' tokens, the facts'
   reliability, and the share of locality outputs unchanged from the small store.
   `--nprobe A B ...` serves each store once per IVF probe count (MOME_MEMORY_INDEX_NPROBE),
   so probe counts are compared within one run; stores searched exactly ignore it.
   `--interleave` serves each of these stores beside a plain server started with it (and
   the provenance-off server), alternating passes and rotating their order each round: the
   ratio is the median of the rounds' ratios, so drift of the machine between server runs
   (up to 28% here) falls out. Idle servers spin for a second after their last message
   (vLLM's queue readers), at the start of the next server's pass, alike for all.

Synthetic experts are registered in blocks (one memorized "fact" per block) so start-up
recovery keeps them. Prints and writes JSON (bench/results/serve.json) with a list `runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
from common import SUBJECTS, TEMPLATES, default_data, pairs_above, recall, synthetic_keys, token_queries

ENGINE = dict(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=1 << 30,
              max_num_seqs=64, enforce_eager=True, enable_prefix_caching=True)
ADMIN_KEY = "bench-admin-key"
BLOCK = 10_000  # synthetic experts per registry record


def make_prompts(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(TEMPLATES).format(rng.choice(SUBJECTS))}]
            for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---- load ------------------------------------------------------------------------------------

async def _one_request(http: httpx.AsyncClient, model: str, messages, output_len: int):
    body = {"model": model, "messages": messages, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or (time.perf_counter() - start), tokens


async def bench_server(url: str, prompts, output_len: int, concurrency: int,
                       repeats: int = 1) -> dict:
    """The median of `repeats` passes over the prompts (by tokens/s; the upper middle one
    for an even count): one pass of a few seconds swings by several percent here."""
    passes = [await one_pass(url, prompts, output_len, concurrency) for _ in range(repeats)]
    median = sorted(passes, key=lambda p: p["output_tokens_per_s"])[len(passes) // 2]
    return {**median, "passes_tokens_per_s": [p["output_tokens_per_s"] for p in passes]}


async def one_pass(url: str, prompts, output_len: int, concurrency: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await _one_request(http, model, prompts[0], 4)  # warm-up, left out
        queue = list(prompts)
        results = []

        async def worker():
            while queue:
                messages = queue.pop()
                results.append(await _one_request(http, model, messages, output_len))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"output_tokens": tokens, "seconds": elapsed, "output_tokens_per_s": tokens / elapsed,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99)}


def bench_offline(model_dir: str, prompts, output_len: int, levels: list[int]) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for p in prompts]
    llm = LLM(model=model_dir, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": ids[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
    out = {}
    for concurrency in levels:
        start, tokens = time.perf_counter(), 0
        # Offline "concurrency c": the same prompts in consecutive batches of c.
        for i in range(0, len(ids), concurrency):
            batch = [{"prompt_token_ids": p} for p in ids[i:i + concurrency]]
            for result in llm.generate(batch, params, use_tqdm=False):
                tokens += len(result.outputs[0].token_ids)
        elapsed = time.perf_counter() - start
        out[concurrency] = {"output_tokens": tokens, "seconds": elapsed,
                            "output_tokens_per_s": tokens / elapsed}
    del llm
    return out


# ---- the facts -------------------------------------------------------------------------------

def load_facts(data: Path, n: int) -> list:
    """The first n CounterFact cases with distinct prompts (bad rows reported and skipped)."""
    from client.eval_data import read_cases

    loaded = read_cases(str(data), "counterfact")
    for bad in loaded.bad:
        print(f"skipped {data}:{bad['line']}: {bad['reason']}")
    seen, cases = set(), []
    for case in loaded.cases:
        if case.prompt not in seen:
            seen.add(case.prompt)
            cases.append(case)
    return cases[:n]


def fact_outputs(url: str, cases) -> tuple[list[bool], list[str]]:
    """Whether each fact's prompt is answered with its target; its locality prompts' outputs."""
    from client.eval_data import answer_tokens, starts_with
    from client.sdk import MomeClient

    client = MomeClient(url)

    def text(prompt: str, max_tokens: int) -> str:
        out = client.complete(prompt, temperature=0, max_tokens=max_tokens)
        return out["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda c: text(c.prompt, answer_tokens(c.target)), cases))
        locality = list(pool.map(lambda p: text(p, 8), [p for c in cases for p in c.locality]))
    return [starts_with(a, c.target) for a, c in zip(answers, cases)], locality


def memorize(url: str, cases) -> None:
    from client.sdk import MomeClient

    client = MomeClient(url, api_key=ADMIN_KEY)
    job = client.wait_for_job(client.add_facts([c.fact() for c in cases])["job_id"], poll=1.0)
    print(f"memorized {job['memorized']}/{len(cases)} facts")


# ---- the store -------------------------------------------------------------------------------

class SyntheticFiller:
    """Adds synthetic experts to a copy of the facts' store, and measures the gate recall of
    the index the server will build over it."""

    def __init__(self, cases, pool_texts: list[str], chat_texts: list[str], recall_queries: int):
        from model.backbone import pull_default_model
        from model.reference import ReferenceModel
        from model.router import Router
        from server.memory_setup import ensure_router
        from server.settings import ServerSettings

        # What the servers started below will read from the same environment (MOME_MEMORY_*).
        self.cfg = ServerSettings().memory_config()
        model_dir = pull_default_model()
        ref = ReferenceModel(model_dir, self.cfg.layer)
        router = Router.load(ensure_router(model_dir, ref, self.cfg.layer, self.cfg.d_k))
        self.d_model = ref.d_model
        self.pool = np.concatenate([token_queries(ref, router, pool_texts),
                                    token_queries(ref, router, chat_texts)])
        queries = np.concatenate([
            token_queries(ref, router, [c.prompt for c in cases]),
            token_queries(ref, router, [p for c in cases for p in c.paraphrases]),
            token_queries(ref, router, chat_texts)])
        rng = np.random.default_rng(1)
        self.queries = queries[rng.permutation(len(queries))[:recall_queries]]

    def fill(self, store_dir: Path, n_total: int, nprobes: list[int]) -> dict:
        """Add synthetic experts up to n_total; returns, per probe count, the served index's
        gate recall and the number of (token, expert) pairs above the gate it was measured
        on."""
        import faiss

        from expert_store import index as ix
        from expert_store.config import IndexConfig
        from expert_store.registry import FactRecord, open_registry
        from model.memory_runtime import open_store

        store = open_store(store_dir, replace(self.cfg, index="flat"), self.d_model)
        registry = open_registry(str(store_dir))
        rng = np.random.default_rng(n_total)
        zeros = np.zeros((BLOCK, self.d_model), dtype=np.float32)
        for start in range(len(store), n_total, BLOCK):
            m = min(BLOCK, n_total - start)
            owner = registry.new_owner()
            ids = store.add(synthetic_keys(self.pool, m, rng), zeros[:m], owner)
            registry.put(FactRecord(owner=owner, kind="completion", status="memorized",
                                    payload={"prompt": f"synthetic experts {start}-{start + m}",
                                             "completion": "(zero values)"},
                                    expert_ids=ids.tolist()))
        store.checkpoint()
        ids = store.allocated_ids()
        keys = store.read_keys(ids)
        store.close()
        registry.close()
        served = IndexConfig(kind=self.cfg.index, ivf_nprobe=self.cfg.index_nprobe)
        exact = ix.build_index(keys, ids, keys.shape[1], IndexConfig(kind="flat"))
        truth = pairs_above(*ix.search(exact, self.queries, self.cfg.top_k), self.cfg.gate)
        del exact
        index = ix.build_index(keys, ids, keys.shape[1], served)
        by_nprobe = {}
        kind = ix.describe(index)
        for nprobe in nprobes if kind == "ivf" else nprobes[:1]:  # exact search has no probes
            if kind == "ivf":
                faiss.extract_index_ivf(index).nprobe = nprobe
            found = pairs_above(*ix.search(index, self.queries, self.cfg.top_k), self.cfg.gate)
            by_nprobe[nprobe] = (recall(truth, found), len(truth))
            print(f"{len(ids)} experts, index {kind}, nprobe {nprobe}: gate "
                  f"recall {by_nprobe[nprobe][0]:.5f} of {len(truth)} pairs above the gate")
        return by_nprobe


# ---- one served store ------------------------------------------------------------------------

def serve(env: dict, workdir: Path, prompts, output_len: int, levels, repeats: int,
          cases=None, new_facts=None) -> dict:
    """Start a server; memorize `new_facts`; measure load at each level (and the facts)."""
    from client.launcher import ServerProcess

    server = ServerProcess(workdir / "server.log", env=env).start()
    try:
        out = {}
        if new_facts:
            memorize(server.url, new_facts)
        if "MOME_ADMIN_KEY" in env:
            out["memory"] = httpx.get(f"{server.url}/v1/memory", timeout=60,
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        if cases:
            out["reliable"], out["locality"] = fact_outputs(server.url, cases)
        out["levels"] = {c: asyncio.run(bench_server(server.url, prompts, output_len, c,
                                                      repeats)) for c in levels}
        out["provenance_sources"] = provenance_sources(server.url)
        return out
    finally:
        server.stop()


def serve_interleaved(envs: dict[str, dict], workdir: Path, prompts, output_len: int, levels,
                      repeats: int, cases=None) -> dict[str, dict]:
    """Start a server per env at once and measure them pass by pass in turn, so what the
    shared machine does meanwhile falls on all of them alike. The order rotates each round
    and runs backwards every other round, so no server always follows the same one (an idle
    server's queue readers spin for a second after its pass). Each server's result is as
    `serve` gives it, plus per level its tokens/s and TTFT p50 over the first env's in the
    same round (`ratio_rounds`, `ttft_p50_ratio_rounds`, in round order) and the median
    round (`ratio`, `ttft_p50_ratio`; the upper middle one for an even count)."""
    from client.launcher import ServerProcess

    servers = {}
    try:
        for name, env in envs.items():  # kept before it starts, so a failed start is stopped
            servers[name] = ServerProcess(workdir / f"server-{name}.log", env=env)
            servers[name].start()
        out = {name: {"levels": {}} for name in envs}
        for name, server in servers.items():
            if "MOME_ADMIN_KEY" in envs[name]:
                out[name]["memory"] = httpx.get(
                    f"{server.url}/v1/memory", timeout=60,
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
            if cases and envs[name].get("MOME_MEMORY", "true") != "false":
                out[name]["reliable"], out[name]["locality"] = fact_outputs(server.url, cases)
        names = list(envs)
        for c in levels:
            passes = {name: [] for name in names}
            for r in range(repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order[::-1] if r % 2 else order:
                    passes[name].append(asyncio.run(
                        one_pass(servers[name].url, prompts, output_len, c)))
            base = passes[names[0]]
            for name in names:
                mine = passes[name]
                rounds = [p["output_tokens_per_s"] / b["output_tokens_per_s"]
                          for p, b in zip(mine, base)]
                ttft = [p["ttft_p50_s"] / b["ttft_p50_s"] for p, b in zip(mine, base)]
                middle = sorted(range(repeats), key=rounds.__getitem__)[repeats // 2]
                out[name]["levels"][c] = {
                    **mine[middle], "passes_tokens_per_s": [p["output_tokens_per_s"] for p in mine],
                    "ratio_rounds": rounds, "ttft_p50_ratio_rounds": ttft,
                    "ratio": rounds[middle], "ttft_p50_ratio": sorted(ttft)[repeats // 2]}
        for name, server in servers.items():
            out[name]["provenance_sources"] = provenance_sources(server.url)
        return out
    finally:
        for server in servers.values():
            try:
                server.stop()
            except Exception as error:  # the others must still stop
                print(f"stopping a server failed: {error!r}")


def provenance_sources(url: str) -> dict[str, int]:
    """How the server found each choice's `mome_facts` so far (its /metrics): from the
    engine's record alone, or with tokens recomputed in the API process (the costly part)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        if family.name == "mome_provenance":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["source"]] = int(sample.value)
    return counts


def main() -> None:
    from model.backbone import pull_default_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, nargs="*", default=[10_000, 1_000_000],
                        help="store sizes beyond the facts' own store")
    parser.add_argument("--real-facts", type=int, default=200,
                        help="CounterFact facts memorized through the API in every store")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3,
                        help="passes per concurrency level; the median one is reported")
    parser.add_argument("--provenance-off", action="store_true",
                        help="also serve each store with MOME_PROVENANCE=false (first, with "
                             "the same requests before the load)")
    parser.add_argument("--interleave", action="store_true",
                        help="serve each large store beside a plain server (and the "
                             "provenance-off one), alternating passes: ratios per round")
    parser.add_argument("--pool-rows", type=int, default=2000,
                        help="CounterFact rows (after the facts) whose tokens seed the keys")
    parser.add_argument("--recall-queries", type=int, default=1024,
                        help="real prompt tokens searched to measure gate recall")
    parser.add_argument("--nprobe", type=int, nargs="+", default=None,
                        help="IVF probe counts to serve each store with (default: as configured)")
    parser.add_argument("--data", default=str(default_data()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.nprobe and (min(args.nprobe) < 1 or len(set(args.nprobe)) < len(args.nprobe)):
        parser.error("--nprobe takes distinct counts of at least 1")
    if args.real_facts < 1:
        parser.error("--real-facts must be at least 1")
    if too_small := [n for n in args.experts if n <= args.real_facts]:
        parser.error(f"--experts {too_small}: each size must exceed --real-facts")
    model_dir = str(pull_default_model())
    prompts = make_prompts(args.num_prompts, args.seed)
    levels = args.concurrency
    rows = load_facts(Path(args.data), args.real_facts + args.pool_rows)
    cases, pool_rows = rows[:args.real_facts], rows[args.real_facts:]
    if len(cases) < args.real_facts or (args.experts and not pool_rows):
        parser.error(f"{args.data} holds {len(rows)} usable facts: too few")
    if len(pool_rows) < args.pool_rows:
        print(f"only {len(pool_rows)} pool rows after the facts in {args.data}")
    report = {"benchmark": "serve", "model": model_dir, "num_prompts": args.num_prompts,
              "output_len": args.output_len, "engine": ENGINE, "real_facts": len(cases),
              "plain": [], "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load = dict(prompts=prompts, output_len=args.output_len, levels=levels,
                    repeats=args.repeats)
        plain_before = serve({"MOME_MEMORY": "false"}, tmp, **load)["levels"]
        facts_store = tmp / "facts-store"
        env = {"MOME_STORE_DIR": str(facts_store), "MOME_ADMIN_KEY": ADMIN_KEY}
        small = serve(env, tmp, **load, cases=cases, new_facts=cases)
        served = [(len(cases), None, (1.0, None), small, True)]
        if args.experts:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            chat_texts = [tokenizer.apply_chat_template([{"role": "user", "content": t.format(s)}],
                                                        add_generation_prompt=True, tokenize=False)
                          for t in TEMPLATES for s in SUBJECTS]
            filler = SyntheticFiller(cases, [r.prompt for r in pool_rows], chat_texts,
                                     args.recall_queries)
            nprobes = args.nprobe or [filler.cfg.index_nprobe]
        for n in sorted(args.experts):
            store_dir = tmp / f"store-{n}"
            shutil.copytree(facts_store, store_dir)
            recalls = filler.fill(store_dir, n, nprobes)  # nprobe: (recall, pairs above gate)
            for nprobe, gate_recall in recalls.items():
                env = {"MOME_STORE_DIR": str(store_dir), "MOME_ADMIN_KEY": ADMIN_KEY,
                       "MOME_MEMORY_INDEX_NPROBE": str(nprobe)}
                off = {**env, "MOME_PROVENANCE": "false"}
                if args.interleave:  # the plain server beside them, pass by pass
                    envs = {"plain": {"MOME_MEMORY": "false"}, "on": env}
                    if args.provenance_off:
                        envs["off"] = off
                    both = serve_interleaved(envs, tmp, **load, cases=cases)
                    for name in ("off", "on"):
                        if name in both:  # with the plain passes it was divided by
                            both[name]["plain_beside"] = both["plain"]["levels"]
                            served.append((n, nprobe, gate_recall, both[name], name == "on"))
                    continue
                if args.provenance_off:  # first, so "on" does not gain from running first
                    served.append((n, nprobe, gate_recall, serve(off, tmp, **load, cases=cases),
                                   False))
                served.append((n, nprobe, gate_recall, serve(env, tmp, **load, cases=cases),
                               True))
            shutil.rmtree(store_dir)
        # The plain server again, last: the ratios divide by the mean of both, and the drift
        # between them says how much the machine itself moved during the run.
        plain_after = serve({"MOME_MEMORY": "false"}, tmp, **load)["levels"]
    # Only the means: each run's whole record is kept as server_first / server_last below.
    plain = {c: {key: (plain_before[c][key] + plain_after[c][key]) / 2
                 for key in ("output_tokens_per_s", "ttft_p50_s", "ttft_p99_s")}
             for c in levels}
    offline = bench_offline(model_dir, prompts, args.output_len, levels)

    for c in levels:
        ratio = plain[c]["output_tokens_per_s"] / offline[c]["output_tokens_per_s"]
        drift = (plain_after[c]["output_tokens_per_s"]
                 / plain_before[c]["output_tokens_per_s"])
        report["plain"].append({"concurrency": c, "server": plain[c], "offline": offline[c],
                                "server_first": plain_before[c], "server_last": plain_after[c],
                                "drift_last_over_first": drift,
                                "ratio_server_over_offline": ratio})
        print(f"plain  c={c:>3}  server {plain[c]['output_tokens_per_s']:7.1f} tok/s  "
              f"offline {offline[c]['output_tokens_per_s']:7.1f} tok/s  ratio {ratio:5.3f}  "
              f"TTFT p50 {plain[c]['ttft_p50_s'] * 1000:7.1f} ms  "
              f"p99 {plain[c]['ttft_p99_s'] * 1000:7.1f} ms  last/first run {drift:5.3f}")
    for n, nprobe, gate_recall, result, provenance in served:
        facts = {}
        if "reliable" in result:
            same = [a == b for a, b in zip(result["locality"], small["locality"])]
            facts = {"reliability": float(np.mean(result["reliable"])),
                     "locality_unchanged": float(np.mean(same)) if same else 1.0}
        memory = result.get("memory", {})
        for c in levels:
            by_level = result["levels"][c]
            index = memory.get("index")
            run = {"experts": memory.get("experts", n), "index": index,
                   "nprobe": nprobe if index == "ivf" else None,
                   "concurrency": c, "provenance": provenance,
                   # Interleaved: the median over rounds against the plain server beside it.
                   "ratio": by_level.get("ratio", by_level["output_tokens_per_s"]
                                         / plain[c]["output_tokens_per_s"]),
                   "ratio_to": "plain beside it" if "ratio" in by_level else "plain first and last",
                   "ttft_p50_ratio": by_level.get("ttft_p50_ratio", by_level["ttft_p50_s"]
                                                  / plain[c]["ttft_p50_s"]),
                   "gate_recall": gate_recall[0], "pairs_above_gate": gate_recall[1],
                   **facts, "provenance_sources": result.get("provenance_sources", {}),
                   "server": by_level}
            if "plain_beside" in result:
                run["plain_beside"] = result["plain_beside"][c]
            report["runs"].append(run)
            probes = f" nprobe {nprobe}" if run["nprobe"] else ""
            print(f"experts {run['experts']:>8} ({index}{probes}) c={c:>3} "
                  f"provenance {'on ' if provenance else 'off'}  "
                  f"{by_level['output_tokens_per_s']:7.1f} tok/s  ratio {run['ratio']:5.3f}  "
                  f"TTFT p50 {by_level['ttft_p50_s'] * 1000:7.1f} ms "
                  f"p99 {by_level['ttft_p99_s'] * 1000:7.1f} ms  gate recall {gate_recall[0]:.4f}"
                  + (f"  reliability {facts['reliability']:.3f} locality unchanged "
                     f"{facts['locality_unchanged']:.3f}" if facts else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
