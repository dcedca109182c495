"""The 200 zsRE rows the development file leaves out, for a check no lever was chosen on.

`../shared/data/zsre-dev.jsonl` holds 800 of the 1,000 rows of zsre_mend_train-1k.json
(public GitHub repository Jometeorie/KnowledgeSpread, data/zsre/, commit 51d7402), shuffled.
The other 200 had never been read by this project when the shipped default ran on them.

    git -C KnowledgeSpread show 51d7402:data/zsre/zsre_mend_train-1k.json > zsre-1k.json
    python unseen_rows.py zsre-1k.json ../shared/data/zsre-dev.jsonl > zsre-unseen-200.jsonl

Writes them as JSON lines in the source file's order (sha256 of the output used here:
8906c82ad99daf8681587df9fbbfb217f16866c907ab707eb07d8558ec934f34).
"""

import json
import sys


def main(source: str, dev: str) -> None:
    with open(dev) as f:
        seen = {json.loads(line)["src"] for line in f if line.strip()}
    with open(source) as f:
        rows = json.load(f)
    for row in rows:
        if row["src"] not in seen:
            sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
