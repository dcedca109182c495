"""Serving under load while a job memorizes: nothing fails, every stream ends, every fact is
memorized; TTFT with memorization running as a ratio to TTFT without, same run.

    python bench/load_while_memorizing.py [--facts 500] [--concurrency 64] [--output-len 24]

Phase 1 (idle): `--concurrency` streaming chat clients for `--idle-seconds`.
Phase 2 (memorizing): the same clients for as long as a job of `--facts` CounterFact facts
takes to finish. Every stream must end with [DONE] and no request may fail.
Prints and writes JSON (bench/results/load_while_memorizing.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "counterfact-slice.jsonl"
KEY = "bench-admin-key"
QUESTIONS = ["Tell me about the ocean.", "What is the capital of France?", "Name three colours.",
             "Explain photosynthesis briefly.", "Write a haiku about snow."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


class Load:
    """Closed-loop streaming clients; counts requests, failures and unterminated streams."""

    def __init__(self, url: str, model: str, concurrency: int, output_len: int):
        self.url, self.model = url, model
        self.concurrency, self.output_len = concurrency, output_len
        self.ttft: list[float] = []
        self.done = self.failed = self.unterminated = 0
        self.errors: list[str] = []

    async def _stream(self, http: httpx.AsyncClient, i: int) -> None:
        body = {"model": self.model, "temperature": 0, "max_tokens": self.output_len,
                "stream": True,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        start, first, ended = time.perf_counter(), None, False
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        ended = True
                    elif line.startswith("data: ") and first is None:
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - every failure counts, whatever it is
            self.failed += 1
            self.errors.append(repr(exc)[:200])
            return
        self.done += 1
        self.unterminated += not ended
        if first is not None:
            self.ttft.append(first)

    async def run_until(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=600,
                                     limits=httpx.Limits(max_connections=self.concurrency)) as http:
            async def client(i: int) -> None:
                n = i
                while not stop.is_set():
                    await self._stream(http, n)
                    n += self.concurrency

            await asyncio.gather(*(client(i) for i in range(self.concurrency)))

    def summary(self) -> dict:
        return {"requests": self.done + self.failed, "failed": self.failed,
                "unterminated_streams": self.unterminated,
                "ttft_p50_s": percentile(self.ttft, 0.5), "ttft_p99_s": percentile(self.ttft, 0.99),
                "errors": self.errors[:5]}


async def measure(url: str, args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"}) as admin:
        model = (await admin.get("/v1/models")).json()["data"][0]["id"]
        idle, stop = Load(url, model, args.concurrency, args.output_len), asyncio.Event()
        task = asyncio.create_task(idle.run_until(stop))
        await asyncio.sleep(args.idle_seconds)
        stop.set()
        await task

        rows = [json.loads(line) for line in DATA.read_text().splitlines()][:args.facts]
        facts = [{"prompt": r["prompt"], "completion": r["target_new"], "subject": r["subject"]}
                 for r in rows]
        busy, stop = Load(url, model, args.concurrency, args.output_len), asyncio.Event()
        task = asyncio.create_task(busy.run_until(stop))
        started = time.perf_counter()
        job_id = (await admin.post("/v1/facts", json={"facts": facts})).json()["job_id"]
        while (job := (await admin.get(f"/v1/jobs/{job_id}")).json())["status"] != "done":
            await asyncio.sleep(1)
        memorize_s = time.perf_counter() - started
        stop.set()
        await task
    idle_s, busy_s = idle.summary(), busy.summary()
    return {"benchmark": "load_while_memorizing", "facts": args.facts,
            "concurrency": args.concurrency, "output_len": args.output_len,
            "memorized": job["memorized"], "failed_facts": job["failed"],
            "superseded": job["superseded"], "memorize_seconds": memorize_s,
            "seconds_per_fact": memorize_s / args.facts, "idle": idle_s, "memorizing": busy_s,
            "ttft_p50_ratio": busy_s["ttft_p50_s"] / max(idle_s["ttft_p50_s"], 1e-9),
            "ttft_p99_ratio": busy_s["ttft_p99_s"] / max(idle_s["ttft_p99_s"], 1e-9)}


def main() -> dict:
    from client.launcher import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--facts", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=24)
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--out", default="bench/results/load_while_memorizing.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "server.log", env={
            "MOME_ADMIN_KEY": KEY, "MOME_STORE_DIR": str(Path(tmp) / "store")}).start()
        try:
            report = asyncio.run(measure(server.url, args))
        finally:
            server.stop()
    for phase in ("idle", "memorizing"):
        s = report[phase]
        print(f"{phase:10s}: {s['requests']:5d} streams, {s['failed']} failed, "
              f"{s['unterminated_streams']} without [DONE], TTFT p50 {s['ttft_p50_s'] * 1e3:.0f} ms "
              f"p99 {s['ttft_p99_s'] * 1e3:.0f} ms")
    print(f"memorized {report['memorized']}/{report['facts']} "
          f"(superseded {report['superseded']}) in {report['memorize_seconds']:.0f} s "
          f"({report['seconds_per_fact']:.2f} s/fact under load); TTFT ratio p50 "
          f"{report['ttft_p50_ratio']:.2f}, p99 {report['ttft_p99_ratio']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
