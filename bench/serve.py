"""Serving throughput, same prompts, same run:
  - the plain HTTP server (MOME_MEMORY=false) vs. vLLM's offline LLM.generate;
  - the server with the memory layer and N experts in its store vs. the plain server.

    python bench/serve.py [--num-prompts 32] [--output-len 32] [--concurrency 1 8 32]
                          [--facts 0 1000]

Stores of N experts are built with real keys (the router's query at the subject of N
CounterFact prompts) and random values of trained experts' size; the benchmark prompts are
unrelated to them, so the layer routes every token and (rightly) fires for none.
Prints and writes JSON (bench/results/serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import httpx

SUBJECTS = ["the ocean", "a violin", "Mount Everest", "the printing press", "honey bees",
            "the Roman Empire", "volcanoes", "a lighthouse", "chess", "the moon", "coffee",
            "glaciers", "the piano", "electricity", "owls", "the Silk Road"]
TEMPLATES = ["Write a short paragraph about {}.", "Tell me three facts about {}.",
             "Explain {} to a child.", "What is interesting about {}?"]

ENGINE = dict(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=1 << 30,
              max_num_seqs=64, enforce_eager=True, enable_prefix_caching=True)


def make_prompts(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(TEMPLATES).format(rng.choice(SUBJECTS))}]
            for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


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


async def bench_server(url: str, prompts, output_len: int, concurrency: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
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


def default_data() -> Path:
    """The whole CounterFact dev file where the development data is, else the tests' slice
    (425 rows: enough for --facts up to 425)."""
    root = Path(__file__).resolve().parents[1]
    full = root.parent / "shared" / "data" / "counterfact-dev.jsonl"
    return full if full.exists() else root / "tests" / "data" / "counterfact-slice.jsonl"


def build_store(store_dir: Path, n: int, data: Path) -> None:
    """A store of n experts keyed like real facts (see the module docstring), each registered
    as a memorized fact: the server's start-up recovery frees experts nobody owns."""
    import shutil

    import numpy as np
    import torch

    from expert_store.registry import FactRecord, open_registry
    from model.backbone import pull_default_model
    from model.config import MemoryConfig
    from model.facts import encode_fact
    from model.memorize import Memorizer
    from model.memory_runtime import load_memory
    from model.reference import ReferenceModel
    from server.memory_setup import ensure_router

    cfg = MemoryConfig()
    model_dir = pull_default_model()
    ref = ReferenceModel(model_dir, cfg.layer)
    shutil.copytree(ensure_router(model_dir, ref, cfg.layer, cfg.d_k), store_dir / "router")
    memory = load_memory(store_dir, store_dir / "router", cfg, ref.d_model)
    rows = [json.loads(line) for line in data.read_text().splitlines()[:n]]
    memorizer = Memorizer(ref, memory, None)
    registry = open_registry(str(store_dir))
    rng = np.random.default_rng(0)
    for i in range(0, n, 256):
        facts = [encode_fact(ref.tokenizer, {"prompt": r["prompt"], "completion": r["target_new"],
                                             "subject": r["subject"]}, 512)
                 for r in rows[i:i + 256]]
        keys = memorizer.keys_for(facts).numpy()
        values = rng.standard_normal((len(facts), ref.d_model)).astype(np.float32) * 5
        owners = [registry.new_owner() for _ in facts]
        ids = memory.store.add(keys, values, np.array(owners))
        for owner, expert_id, fact in zip(owners, ids.tolist(), facts):
            registry.put(FactRecord(owner=owner, kind="completion", payload=fact.payload,
                                    status="memorized", expert_ids=[expert_id]))
    memory.store.close()
    registry.close()
    del ref, torch


def serve_levels(env: dict, workdir: Path, prompts, output_len: int, levels) -> tuple[dict, int]:
    """Results per concurrency level, and how many experts the server's store holds."""
    from client.launcher import ServerProcess

    server = ServerProcess(workdir / "server.log", env=env).start()
    try:
        experts = 0
        if key := env.get("MOME_ADMIN_KEY"):
            memory = httpx.get(f"{server.url}/v1/memory", timeout=30,
                               headers={"Authorization": f"Bearer {key}"}).json()
            experts = memory["experts"]
        return ({c: asyncio.run(bench_server(server.url, prompts, output_len, c))
                 for c in levels}, experts)
    finally:
        server.stop()


def main() -> None:
    from model.backbone import pull_default_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--facts", type=int, nargs="*", default=[0, 1000],
                        help="store sizes to serve with the memory layer on")
    parser.add_argument("--data", default=str(default_data()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()

    model_dir = str(pull_default_model())
    prompts = make_prompts(args.num_prompts, args.seed)
    levels = args.concurrency
    report = {"benchmark": "serve", "model": model_dir, "num_prompts": args.num_prompts,
              "output_len": args.output_len, "engine": ENGINE, "plain": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, _ = serve_levels({"MOME_MEMORY": "false"}, tmp, prompts, args.output_len, levels)
        memory, served = {}, {}
        for n in args.facts:
            store_dir = tmp / f"store-{n}"
            store_dir.mkdir()
            build_store(store_dir, n, Path(args.data))
            memory[n], served[n] = serve_levels({"MOME_STORE_DIR": str(store_dir),
                                                 "MOME_ADMIN_KEY": "bench-admin-key"},
                                                tmp, prompts, args.output_len, levels)
    offline = bench_offline(model_dir, prompts, args.output_len, levels)

    for c in levels:
        ratio = plain[c]["output_tokens_per_s"] / offline[c]["output_tokens_per_s"]
        report["plain"].append({"concurrency": c, "server": plain[c], "offline": offline[c],
                                "ratio_server_over_offline": ratio})
        print(f"plain  c={c:>3}  server {plain[c]['output_tokens_per_s']:7.1f} tok/s  "
              f"offline {offline[c]['output_tokens_per_s']:7.1f} tok/s  ratio {ratio:5.3f}  "
              f"TTFT p50 {plain[c]['ttft_p50_s'] * 1000:7.1f} ms  "
              f"p99 {plain[c]['ttft_p99_s'] * 1000:7.1f} ms")
    for n, by_level in memory.items():
        for c in levels:
            ratio = by_level[c]["output_tokens_per_s"] / plain[c]["output_tokens_per_s"]
            report["memory"].append({"facts": n, "experts_served": served[n],
                                     "concurrency": c, "server": by_level[c], "ratio": ratio})
            print(f"memory N={n:>5} c={c:>3}  {by_level[c]['output_tokens_per_s']:7.1f} tok/s  "
                  f"ratio to plain server {ratio:5.3f}  experts served {served[n]}  "
                  f"TTFT p50 {by_level[c]['ttft_p50_s'] * 1000:7.1f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
