"""Serving throughput: the HTTP server vs. vLLM's offline LLM.generate, same prompts, same run.

    python bench/serve.py [--num-prompts 32] [--output-len 32] [--concurrency 1 8 32]

Prints and writes JSON (bench/results/serve.json): output tokens/s and time to first token
p50/p99 per concurrency, and the ratio server/offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
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


def main() -> None:
    from client.launcher import ServerProcess
    from model.backbone import pull_default_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()

    model_dir = str(pull_default_model())
    prompts = make_prompts(args.num_prompts, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "server.log",
                               env={"MOME_STORE_DIR": str(Path(tmp) / "store")}).start()
        try:
            served = {c: asyncio.run(bench_server(server.url, prompts, args.output_len, c))
                      for c in args.concurrency}
        finally:
            server.stop()
    offline = bench_offline(model_dir, prompts, args.output_len, args.concurrency)

    rows = []
    for c in args.concurrency:
        ratio = served[c]["output_tokens_per_s"] / offline[c]["output_tokens_per_s"]
        rows.append({"concurrency": c, "server": served[c], "offline": offline[c],
                     "ratio_server_over_offline": ratio})
        print(f"c={c:>3}  server {served[c]['output_tokens_per_s']:8.1f} tok/s  "
              f"offline {offline[c]['output_tokens_per_s']:8.1f} tok/s  ratio {ratio:5.3f}  "
              f"TTFT p50 {served[c]['ttft_p50_s'] * 1000:7.1f} ms  "
              f"p99 {served[c]['ttft_p99_s'] * 1000:7.1f} ms")
    report = {"benchmark": "serve", "model": model_dir, "num_prompts": args.num_prompts,
              "output_len": args.output_len, "engine": ENGINE, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
