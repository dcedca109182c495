"""Each recipe's trade-off over second-key thresholds: rephrasings answered / other-relation
near misses kept, per threshold, on one split of a `recipes.py` scores file.

Usage: python reports/relation-map-offline/curve.py SCORES.jsonl SPLIT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conjunction-offline"))

from conjunction import figures  # noqa: E402


def main() -> None:
    path, split = sys.argv[1:3]
    rows = [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["split"] == split]
    names = next(iter(next(r for r in rows if r["fired"])["fired"].values())).keys()
    print("threshold: rephrasings answered / other-relation near misses kept")  # noqa: T201
    for name in names:
        points = []
        for t in (x / 100 for x in range(25, 70, 3)):
            f = figures(rows, name, t)
            points.append(f"{t:.2f}: {f['paraphrase']['hit']:.3f}/{f['near_miss_relation']['hit']:.3f}")
        print(f"{name}  " + "  ".join(points))  # noqa: T201


if __name__ == "__main__":
    main()
