"""Device cache: expert value rows on the compute device, LRU over a fixed number of slots.

The model reads values through `lookup`; misses are copied from the store's host table.
On this machine the device is the CPU; the same code runs with a CUDA device. One lock guards
the slot table: the serving side (refresh after a delete) and the memorization worker
(training lookups) use the same cache from different threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from expert_store.store import ExpertStore


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class DeviceCache:
    def __init__(self, store: ExpertStore, capacity: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.store = store
        self.capacity = capacity
        self.slots = torch.zeros((capacity, *store.cfg.value_shape), dtype=dtype, device=device)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # expert id -> slot, LRU first
        self._free_slots = list(range(capacity - 1, -1, -1))
        self._pinned: set[int] = set()
        self.version = store.version
        self.stats = CacheStats()
        self._lock = threading.RLock()

    def __contains__(self, expert_id: int) -> bool:
        return expert_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def pin(self, expert_id: int) -> bool:
        """Keep an expert resident (it is loaded if needed); returns whether it was newly pinned."""
        with self._lock:
            if expert_id in self._pinned:
                return False
            self.lookup(np.array([expert_id]))
            self._pinned.add(expert_id)
            return True

    def unpin(self, expert_id: int) -> bool:
        with self._lock:
            if expert_id not in self._pinned:
                return False
            self._pinned.discard(expert_id)
            return True

    def lookup(self, ids: np.ndarray) -> torch.Tensor:
        """Values of experts `ids` (n,) as a (n, *value_shape) tensor on the device."""
        with self._lock:
            return self._lookup(np.asarray(ids, dtype=np.int64))

    def _lookup(self, ids: np.ndarray) -> torch.Tensor:
        unique = list(dict.fromkeys(ids.tolist()))
        if len(unique) > self.capacity:
            raise ValueError(f"{len(unique)} distinct experts do not fit {self.capacity} slots")
        missing = [e for e in unique if e not in self._slot_of]
        self.stats.hits += len(unique) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            slots = [self._take_slot(protect=set(unique)) for _ in missing]
            rows = torch.from_numpy(self.store.read_values(np.array(missing)))
            self.slots[slots] = rows.to(self.slots.device, self.slots.dtype)
            for expert_id, slot in zip(missing, slots):
                self._slot_of[expert_id] = slot
        for expert_id in unique:  # most recently used last, in the order asked
            self._slot_of.move_to_end(expert_id)
        index = torch.tensor([self._slot_of[e] for e in ids.tolist()], device=self.slots.device)
        return self.slots.index_select(0, index)

    def _take_slot(self, protect: set[int]) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        for expert_id in self._slot_of:  # least recently used first
            if expert_id not in self._pinned and expert_id not in protect:
                self.stats.evictions += 1
                return self._slot_of.pop(expert_id)
        raise RuntimeError("every slot is pinned or in use by this lookup")

    def invalidate(self, ids: np.ndarray | None = None) -> int:
        """Drop cached rows (all when `ids` is None); returns how many were dropped."""
        with self._lock:
            return self._invalidate(ids)

    def _invalidate(self, ids: np.ndarray | None) -> int:
        targets = list(self._slot_of) if ids is None else [int(i) for i in ids]
        dropped = 0
        for expert_id in targets:
            slot = self._slot_of.pop(expert_id, None)
            if slot is not None:
                self._free_slots.append(slot)
                self._pinned.discard(expert_id)
                dropped += 1
        return dropped

    def refresh(self) -> bool:
        """Follow the store's version: stale rows are dropped; returns whether it changed."""
        with self._lock:
            if self.store.version == self.version:
                return False
            self._invalidate(None)
            self.version = self.store.version
            return True
