"""Child process of the crash test: writes to a store forever, reporting each committed write.

Before each write it prints "begin OP OWNER"; after the store returned (committed), "ok".
"""

from __future__ import annotations

import sys

import numpy as np

from expert_store.config import StoreConfig
from expert_store.store import ExpertStore


def main(path: str) -> None:
    store = ExpertStore.open(path, StoreConfig(d_k=8, value_shape=(16,), initial_capacity=4))
    rng = np.random.default_rng(int(sys.argv[2]))
    step = 0
    while True:
        step += 1
        n = int(rng.integers(1, 40))  # writes of many sizes, so kills land mid-record
        owner = step
        keys = rng.standard_normal((n, 8)).astype(np.float32)
        values = np.full((n, 16), owner, dtype=np.float32)
        print(f"begin add {owner}", flush=True)
        store.add(keys, values, owner)
        print("ok", flush=True)
        if step % 3 == 0:
            victim = int(rng.integers(1, step))
            print(f"begin free {victim}", flush=True)
            store.free(store.ids_of_owner(victim))
            print("ok", flush=True)
        if step % 5 == 0:
            print(f"begin values {owner}", flush=True)
            own = store.ids_of_owner(owner)
            store.write_values(own, np.full((len(own), 16), -owner, dtype=np.float32))
            print("ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
