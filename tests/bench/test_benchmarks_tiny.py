"""Every benchmark runs at a tiny size, so none can rot unnoticed; each must print its
figures and write JSON that other tools can read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# The repository's slice, also where the development data sits beside the checkout (the
# benchmarks default to it there).
SLICE = str(ROOT / "tests" / "data" / "counterfact-slice.jsonl")


def run_bench(script: str, *args: str, out: Path, timeout: float = 1200,
              env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, f"bench/{script}", *args, "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    return json.loads(out.read_text())


def test_store_bench(tmp_path):
    # 5,000: below 4,096 keys the store searches exactly and there is no IVF to measure.
    report = run_bench("store.py", "--experts", "5000", "--nprobe", "4", "--exact-batches", "1",
                       out=tmp_path / "store.json", timeout=600)
    assert report["experts"] == 5000 and "ivf_nprobe4" in report["search"]


def test_memorize_bench(tmp_path):
    report = run_bench("memorize.py", "--batches", "1", "4", "--data", SLICE, out=tmp_path / "memorize.json")
    assert [r["batch"] for r in report["results"]] == [1, 4]
    assert all(r["memorized"] == r["batch"] for r in report["results"])
    assert all(r["phase_seconds"]["train"] > 0 for r in report["results"])


def test_serve_bench_with_memorized_facts_and_registered_synthetic_experts(tmp_path):
    # The synthetic experts are registered: start-up recovery must keep them (it used to free
    # unregistered experts as orphans, and then hang), so the server serves all 5,000, with
    # the IVF index asked for, as the bench's gate-recall measurement builds it.
    report = run_bench("serve.py", "--num-prompts", "4", "--output-len", "4",
                       "--concurrency", "1", "4", "--repeats", "1", "--real-facts", "3",
                       "--experts", "5000", "--nprobe", "32", "4", "--interleave",
                       "--pool-rows", "20", "--recall-queries", "256", "--data", SLICE,
                       out=tmp_path / "serve.json", env={"MOME_MEMORY_INDEX": "ivf"})
    small, large, few_probes = [r for r in report["runs"] if r["concurrency"] == 4]
    assert (small["experts"], small["index"], small["nprobe"]) == (3, "flat", None)
    assert (large["experts"], large["index"], large["nprobe"]) == (5000, "ivf", 32)
    assert (few_probes["index"], few_probes["nprobe"]) == ("ivf", 4)  # one server per count
    assert large["pairs_above_gate"] > 0 and large["gate_recall"] >= 0.95
    assert few_probes["pairs_above_gate"] == large["pairs_above_gate"]  # the same exact truth
    for run in (small, large, few_probes):
        assert run["ratio"] > 0 and run["reliability"] == 1.0
    # Synthetic values are zero: the facts' locality prompts read exactly as before.
    assert large["locality_unchanged"] == 1.0
    # The plain server ran first and last; ratios divide by the mean of both.
    assert [p["concurrency"] for p in report["plain"]] == [1, 4]
    for plain in report["plain"]:
        first, last = (plain[k]["output_tokens_per_s"] for k in ("server_first", "server_last"))
        assert plain["server"]["output_tokens_per_s"] == pytest.approx((first + last) / 2)
        assert plain["drift_last_over_first"] == pytest.approx(last / first)
        assert len(plain["server_first"]["passes_tokens_per_s"]) == 1  # --repeats 1
    # The facts' own store ran alone and divides by that mean; the large stores ran beside a
    # plain server of their own (--interleave), one round here (--repeats 1).
    plain_c4 = report["plain"][1]["server"]["output_tokens_per_s"]
    assert small["ratio"] == pytest.approx(small["server"]["output_tokens_per_s"] / plain_c4)
    for run in (large, few_probes):
        beside = run["plain_beside"]["output_tokens_per_s"]
        assert run["ratio_to"] == "plain beside it" and beside > 0
        assert run["ratio"] == run["server"]["ratio_rounds"][0] == pytest.approx(
            run["server"]["output_tokens_per_s"] / beside)


def test_load_while_memorizing_bench(tmp_path):
    report = run_bench("load_while_memorizing.py", "--facts", "12", "--concurrency", "8",
                       "--output-len", "8", "--idle-seconds", "8",
                       out=tmp_path / "load.json")
    for phase in ("idle", "memorizing"):
        assert report[phase]["requests"] > 0 and report[phase]["failed"] == 0
        assert report[phase]["unterminated_streams"] == 0
    assert report["memorized"] + report["superseded"] == 12 and report["failed_facts"] == 0


def test_gate_recall_bench(tmp_path):
    report = run_bench("gate_recall.py", "--experts", "6000", "--facts", "10", "--pool-rows",
                       "40", "--nprobe", "4", "32", "--data", SLICE, out=tmp_path / "gate_recall.json")
    assert [run["nprobe"] for run in report["runs"]] == [4, 32]
    for run in report["runs"]:
        assert run["experts"] == 6000 and run["index"] == "ivf"
        assert run["pairs_above_gate"] > 0 and 0 < run["gate_recall"] <= 1


def test_multi_turn_bench(tmp_path):
    # Two facts, asked alone and after an earlier exchange, beside a plain server: the later
    # turn goes through the engine's alone view (the store holds experts).
    report = run_bench("multi_turn.py", "--facts", "2", "--num-prompts", "4", "--output-len", "4",
                       "--concurrency", "2", "--repeats", "1",
                       "--data", str(ROOT / "tests" / "data" / "zsre-slice.jsonl"),
                       out=tmp_path / "multi_turn.json")
    assert report["facts_memorized"] == 2 and report["facts_answered"]["single"] == 1.0
    assert report["facts_answered"]["later"] >= 0.5  # a later turn still reaches a fact
    [run] = report["runs"]
    for name in ("single", "later"):
        assert run[name]["ratio"] > 0 and run[name]["ttft_p50_s"][0] > 0
    # Every choice's provenance came from the engine's own record, none recomputed.
    assert set(report["provenance_sources"]) == {"engine"}
    # The memory server holds more (the memorizer's model, the engine's copy of the lower
    # layers for the view) than the plain one.
    assert report["resident_bytes"]["memory"] > report["resident_bytes"]["plain"] > 0
