"""The two implementations of the memory layer (transformers reference, vLLM plugin model)
give the same greedy output on memorized and unrelated prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.memorize import answer_matches

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "data" / "counterfact-slice.jsonl"


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    script = Path(__file__).with_name("parity_check.py")
    workdir = tmp_path_factory.mktemp("parity")
    result = subprocess.run([sys.executable, str(script), str(workdir), str(DATA)],
                            capture_output=True, text=True, timeout=900,
                            cwd=Path(__file__).resolve().parents[2])
    line = next((x for x in result.stdout.splitlines() if x.startswith("PARITY ")), None)
    assert line, result.stderr[-3000:]
    return json.loads(line[len("PARITY "):])


def test_reference_and_vllm_agree(parity):
    out = parity
    assert out["versions"] == [out["store_version"]]
    assert out["vllm"] == out["reference"]  # the same greedy tokens
    for answer, text in zip(out["answers"], out["vllm_text"]):
        assert answer_matches(text, answer), (answer, text)


def test_the_engines_fired_log_names_what_fired(parity):
    """The serving forward's record of which facts fired per request (model/fired_log.py)
    equals a second forward over the same tokens, and flags a prompt the prefix cache served
    when the request carries no prompt key."""
    records, oracle = parity["fired"], parity["fired_oracle"]
    assert [r["owners"] for r in records] == oracle
    assert not any(r["incomplete"] or r["prompt_cached"] for r in records)
    n_facts = parity["n_memorized"]
    assert all(oracle[:n_facts])  # every memorized prompt fires its fact
    # The chat fact asked after an exchange fires too, its turn read as if asked alone.
    assert parity["later_chat_owner"] in oracle[-1]
    assert len(parity["owners"]) > 2  # several facts, so a wrong attribution would show
    first, second = parity["cached"]
    assert not first["prompt_cached"] and first["owners"] == parity["long_oracle"]
    assert second["prompt_cached"] and set(second["owners"]) <= set(parity["long_oracle"])


def test_a_prompt_the_prefix_cache_served_is_named_from_the_engine(parity):
    """With the prompt's cache key (as the server sends it), the cached blocks' firings come
    from the request that computed them: nothing left for the server to recompute."""
    oracle = parity["fact_first_oracle"]
    # The first computed it whole; the second was served its first block(s) from the cache.
    assert parity["keyed_cached"][0] == 0 and parity["keyed_cached"][1] >= 128
    # The fact fires within the first KV block (128 tokens on CPU), which the cache serves.
    assert oracle and parity["fact_first_head_oracle"] == oracle
    for record in parity["keyed"]:
        assert not record["prompt_cached"] and not record["incomplete"]
        assert record["owners"] == oracle
