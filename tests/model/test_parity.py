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


def test_reference_and_vllm_agree(tmp_path):
    script = Path(__file__).with_name("parity_check.py")
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(DATA)],
                            capture_output=True, text=True, timeout=900,
                            cwd=Path(__file__).resolve().parents[2])
    line = next((x for x in result.stdout.splitlines() if x.startswith("PARITY ")), None)
    assert line, result.stderr[-3000:]
    out = json.loads(line[len("PARITY "):])
    assert out["versions"] == [out["store_version"]]
    assert out["vllm"] == out["reference"]  # the same greedy tokens
    for answer, text in zip(out["answers"], out["vllm_text"]):
        assert answer_matches(text, answer), (answer, text)
