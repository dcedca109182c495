"""Memorization speed through the real server's admin API, CounterFact facts.

    python bench/memorize.py [--batches 1 8 64] [--data tests/data/counterfact-slice.jsonl]

For each batch size, posts that many new facts as one job and times it until done
(training, commit, engine refresh and verification through the serving path included), and
reads where the worker spent that time (its log line per batch: route, train, commit,
verify). Prints and writes JSON (bench/results/memorize.json).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "counterfact-slice.jsonl"
# The worker's closing line of a batch (model/memorize.py, PhaseClock).
BATCH_LINE = re.compile(r"memorized (\d+)/(\d+) facts in ([\d.]+) s \(([^)]*)\)")


def phases(log: Path, after: int) -> tuple[dict[str, float], int]:
    """Seconds per phase summed over the batches logged after line `after`; the new end."""
    lines = log.read_text(errors="replace").splitlines()
    total: dict[str, float] = {}
    for line in lines[after:]:
        if match := BATCH_LINE.search(line):
            for part in match.group(4).split(", "):
                name, seconds = part.rsplit(" ", 1)
                total[name] = total.get(name, 0.0) + float(seconds)
    return total, len(lines)


def main() -> None:
    from client.launcher import ServerProcess
    from client.sdk import MomeClient

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--offset", type=int, default=0, help="first CounterFact row used")
    parser.add_argument("--out", default="bench/results/memorize.json")
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    rows = rows[args.offset:]
    key = "bench-admin-key"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "server.log",
                               env={"MOME_ADMIN_KEY": key,
                                    "MOME_STORE_DIR": str(Path(tmp) / "store")}).start()
        try:
            client = MomeClient(server.url, api_key=key)
            used, log_end = 0, 0
            for size in args.batches:
                batch = rows[used:used + size]
                used += size
                facts = [{"prompt": r["prompt"], "completion": r["target_new"],
                          "subject": r["subject"]} for r in batch]
                start = time.perf_counter()
                job = client.wait_for_job(client.add_facts(facts)["job_id"], poll=0.2)
                elapsed = time.perf_counter() - start
                steps = [f["steps"] for f in client.list_facts() if f["job_id"] == job["id"]]
                spent, log_end = phases(server.log_path, log_end)
                row = {"batch": size, "seconds": elapsed, "seconds_per_fact": elapsed / size,
                       "facts_per_minute": 60 * size / elapsed, "memorized": job["memorized"],
                       "failed": job["failed"], "mean_steps": sum(steps) / len(steps),
                       "phase_seconds": spent}
                results.append(row)
                print(f"batch {size:3d}: {elapsed:7.1f} s  {row['seconds_per_fact']:6.2f} s/fact  "
                      f"{row['facts_per_minute']:6.1f} facts/min  memorized {job['memorized']}/"
                      f"{size}  mean steps {row['mean_steps']:.1f}  phases "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()))
        finally:
            server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "memorize", "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
