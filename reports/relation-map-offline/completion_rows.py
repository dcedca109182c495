"""Write the completion map's bundled rows (model/data/completion_relation_rows.jsonl):
CounterFact rows 1000-1999 as (subject, src, rephrase), cut as `recipes.counterfact_rows`
cuts them for the offline `counterfact-completion` recipe.

Usage, from the repository root:
    python reports/relation-map-offline/completion_rows.py ../shared/data/counterfact-dev.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipes import counterfact_rows  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "model" / "data" / "completion_relation_rows.jsonl"

if __name__ == "__main__":
    rows = counterfact_rows(sys.argv[1])
    OUT.write_text("".join(json.dumps({"subject": r["subject"], "src": r["src"],
                                       "rephrase": r["rephrase"]}) + "\n" for r in rows))
    print(f"{len(rows)} rows of 1000 written to {OUT}")  # noqa: T201
