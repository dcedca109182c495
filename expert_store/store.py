"""The expert store: keys, values and owners of up to millions of experts, on disk, searchable.

Layout of a store directory:
    config.json   the StoreConfig (fixed at creation)
    meta.json     checkpoint: version, high-water mark, capacity, with its own checksum
    keys.f32 / values.<dtype> / owners.i64   memory-mapped tables (owner -1 = free row)
    relations.f32 each expert's second key (model/relation_key.py; zero: none)
    relation_maps.u8  which of the router's relation maps it compares through (0: the first)
    wal.log       committed writes since the checkpoint
    lock          serializes writers across processes (flock)

Every write is one WAL record (fsynced) applied to the tables afterwards, so a crash at any
point leaves the store loadable at its last committed version. `version` increases by one per
committed write; readers (other processes, device caches) refresh from it.

Freed experts are not reused at once: a serving engine that still searches an older index
would find the old key and read the new value of whoever took the row. A freed row waits in
quarantine until `release_freed(version)` says every serving process serves a version past
its free; its old value stays in place until then (it is overwritten when reused).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from expert_store import index as ix
from expert_store.config import IndexConfig, StoreConfig
from expert_store.tables import MappedTable
from expert_store.wal import WriteAheadLog, decode_arrays, encode_arrays

FREE = -1
_CHECKPOINT_WAL_BYTES = 64 << 20


class StoreCorrupted(RuntimeError):
    pass


def _write_json_atomic(path: Path, data: dict) -> None:
    body = json.dumps(data, sort_keys=True)
    payload = json.dumps({"data": data, "crc32": zlib.crc32(body.encode())}, sort_keys=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json_checked(path: Path) -> dict:
    wrapper = json.loads(path.read_text())
    body = json.dumps(wrapper["data"], sort_keys=True)
    if zlib.crc32(body.encode()) != wrapper["crc32"]:
        raise StoreCorrupted(f"{path} fails its checksum")
    return wrapper["data"]


class ExpertStore:
    """Open with `ExpertStore.open(path, cfg)`; `cfg` is needed only to create a new store."""

    def __init__(self, path: Path, cfg: StoreConfig):
        self.path = path
        self.cfg = cfg
        self._lock = threading.RLock()
        capacity = cfg.initial_capacity
        self.keys = MappedTable(path / "keys.f32", (cfg.d_k,), "float32", capacity)
        self.values = MappedTable(path / f"values.{cfg.value_dtype}", cfg.value_shape,
                                  cfg.value_dtype, capacity)
        self.owners = MappedTable(path / "owners.i64", (), "int64", capacity, fill=FREE)
        # Added after the first stores were written: a store without it gets one of zeros.
        self.relations = MappedTable(path / "relations.f32", (cfg.d_k,), "float32", capacity)
        self.relation_maps = MappedTable(path / "relation_maps.u8", (), "uint8", capacity)
        self._wal = WriteAheadLog(path / "wal.log")
        self._lock_file = open(path / "lock", "a+")
        self.version = 0
        self.high_water = 0  # rows below this were allocated at some point
        self._free: list[int] = []  # reusable rows, lowest last (popped first)
        self._quarantine: dict[int, int] = {}  # freed row -> store version that freed it
        self._load()

    @property
    def _tables(self) -> tuple[MappedTable, ...]:
        return (self.keys, self.values, self.owners, self.relations, self.relation_maps)

    # ---- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, cfg: StoreConfig | None = None,
             index: IndexConfig | None = None) -> ExpertStore:
        """`index` overrides the saved index configuration for this process only: the index
        is rebuilt from the tables at every open, so nothing on disk depends on it."""
        path = Path(path)
        config_file = path / "config.json"
        if config_file.exists():
            stored = StoreConfig.from_dict(_read_json_checked(config_file))
            if cfg is not None and (stored.d_k, stored.value_shape) != (cfg.d_k, cfg.value_shape):
                raise ValueError(f"store at {path} has d_k={stored.d_k}, value_shape="
                                 f"{stored.value_shape}; asked for {cfg.d_k}, {cfg.value_shape}")
            return cls(path, replace(stored, index=index) if index else stored)
        if cfg is None:
            raise FileNotFoundError(f"no expert store at {path} and no config to create one")
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, replace(cfg, index=index) if index else cfg)
        store._checkpoint_held()
        _write_json_atomic(config_file, cfg.to_dict())
        return store

    def _load(self) -> None:
        # Under the writer lock: a checkpoint must not land between reading meta.json and
        # replaying the WAL, and a "torn tail" may be a record another process is writing.
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            # A writer killed while growing the tables leaves them at different sizes (later
            # writes check only the keys table's): finish the growth it started.
            tables = self._tables
            largest = max(t.capacity for t in tables)
            for table in tables:
                table.grow(largest)
            meta_file = self.path / "meta.json"
            if meta_file.exists():
                meta = _read_json_checked(meta_file)
                for table in self._tables:
                    if table.capacity < meta["capacity"]:
                        raise StoreCorrupted(f"{table.path} holds {table.capacity} rows; "
                                             f"the checkpoint says {meta['capacity']}")
                self.version = meta["version"]
                self.high_water = meta["high_water"]
            # self.version is the checkpoint's here; the index is built from the tables below.
            self._replay_wal(self.version, update_index=False)
            self._wal.truncate_torn_tail()
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._rebuild_free_list()
        self._index = self._build_index()

    def _rebuild_free_list(self) -> None:
        """Free rows from the owners table; rows freed by another handle (or before this one
        opened the store) are quarantined at the current version, since nobody here knows
        whether the serving engines have seen their free yet."""
        free_rows = np.flatnonzero(np.asarray(self.owners.array[: self.high_water]) == FREE)
        reusable = set(self._free)
        self._quarantine = {int(i): self._quarantine.get(int(i), self.version)
                            for i in free_rows if int(i) not in reusable}
        # Pop from the end: the lowest free ids are reused first.
        self._free = sorted((int(i) for i in free_rows if int(i) in reusable), reverse=True)

    def release_freed(self, served_version: int) -> int:
        """Serving engines now serve `served_version` or later: rows freed up to it may be
        reused. Returns how many became reusable."""
        with self._lock:
            ready = [i for i, v in self._quarantine.items() if v <= served_version]
            for expert_id in ready:
                del self._quarantine[expert_id]
            self._free = sorted(self._free + ready, reverse=True)
            return len(ready)

    @property
    def quarantined(self) -> int:
        """Freed rows waiting for the serving engines to confirm their free."""
        return len(self._quarantine)

    def _build_index(self):
        ids = self.allocated_ids()
        return ix.build_index(np.asarray(self.keys.array[ids]), ids, self.cfg.d_k, self.cfg.index)

    # ---- reading ----------------------------------------------------------------------------

    def allocated_ids(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.owners.array[: self.high_water]) != FREE)

    def __len__(self) -> int:
        return self.high_water - len(self._free) - len(self._quarantine)

    def owner_of(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.owners.array[np.asarray(ids, dtype=np.int64)])

    def ids_of_owner(self, owner: int) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.owners.array[: self.high_water]) == owner)

    def read_values(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.values.array[np.asarray(ids, dtype=np.int64)])

    def read_keys(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.keys.array[np.asarray(ids, dtype=np.int64)])

    def read_relations(self, ids: np.ndarray) -> np.ndarray:
        """Second keys (n, d_k) of experts; a zero row: the expert has none."""
        return np.asarray(self.relations.array[np.asarray(ids, dtype=np.int64)])

    def read_relation_maps(self, ids: np.ndarray) -> np.ndarray:
        """Which of the router's relation maps (n,) experts' second keys compare through."""
        return np.asarray(self.relation_maps.array[np.asarray(ids, dtype=np.int64)])

    @property
    def index_kind(self) -> str:
        """The structure searched now: "flat", "ivf" or "hnsw"."""
        return ix.describe(self._index)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k experts by key inner product: D scores, I expert ids (-1 where none)."""
        with self._lock:
            return ix.search(self._index, xq, k)

    # ---- writing (each call is one committed, versioned write) ------------------------------

    def add(self, keys: np.ndarray, values: np.ndarray, owners: np.ndarray | int,
            relations: np.ndarray | None = None,
            relation_maps: np.ndarray | None = None) -> np.ndarray:
        """Allocate len(keys) experts (reusing freed ones first) and write them; returns ids.
        `relations`: their second keys (model/relation_key.py), none if None; `relation_maps`:
        the router's map each compares through (the first if None)."""
        keys = self._check_keys(keys)
        relations = (np.zeros_like(keys) if relations is None else self._check_keys(relations))
        if len(relations) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(relations)} second keys")
        relation_maps = np.zeros(len(keys), np.int64) if relation_maps is None else \
            np.asarray(relation_maps)
        if relation_maps.shape != (len(keys),):
            raise ValueError(f"{len(keys)} keys but {relation_maps.shape} relation maps")
        if not np.isin(relation_maps, np.arange(256)).all():
            raise ValueError("relation maps are indexes from 0 to 255")
        relation_maps = relation_maps.astype(np.uint8)
        values = self._check_values(values, len(keys))
        owners = np.broadcast_to(np.asarray(owners, dtype=np.int64), (len(keys),)).copy()
        if (owners == FREE).any():
            raise ValueError("owner -1 is reserved for free experts")
        with self._writing():
            ids = self._allocate(len(keys))
            self._commit({"op": np.array("write"), "ids": ids, "keys": keys, "values": values,
                          "owners": owners, "relations": relations,
                          "relation_maps": relation_maps, "high_water": np.array(self.high_water)})
            ix.add(self._index, keys, ids)
            self._switch_index_if_outgrown()
            return ids

    def write_values(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Overwrite the values of allocated experts (a training step's result)."""
        ids = self._check_allocated(ids)
        values = self._check_values(values, len(ids))
        with self._writing():
            self._commit({"op": np.array("values"), "ids": ids, "values": values,
                          "high_water": np.array(self.high_water)})

    def write_keys(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Re-key allocated experts, keeping their values and owners (a gate adjustment)."""
        ids = self._check_allocated(ids)
        keys = self._check_keys(keys)
        if len(keys) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(keys)} keys")
        with self._writing():
            self._commit({"op": np.array("write"), "ids": ids, "keys": keys,
                          "values": self.read_values(ids), "owners": self.owner_of(ids),
                          "relations": self.read_relations(ids),
                          "relation_maps": self.read_relation_maps(ids),
                          "high_water": np.array(self.high_water)})
            ix.remove(self._index, ids)
            ix.add(self._index, keys, ids)

    def free(self, ids: np.ndarray) -> int:
        """Give experts back; returns how many were allocated. The rows are quarantined
        (see `release_freed`) and keep their values until reused."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        with self._writing():
            ids = ids[(ids >= 0) & (ids < self.high_water)]
            ids = ids[self.owner_of(ids) != FREE]
            if len(ids) == 0:
                return 0
            self._commit({"op": np.array("free"), "ids": ids,
                          "high_water": np.array(self.high_water)})
            ix.remove(self._index, ids)
            for expert_id in ids.tolist():
                self._quarantine[expert_id] = self.version
            return len(ids)

    def _allocate(self, n: int) -> np.ndarray:
        reused = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = np.arange(self.high_water, self.high_water + n - len(reused), dtype=np.int64)
        self.high_water += len(fresh)
        if self.high_water > self.keys.capacity:
            capacity = self.keys.capacity
            while capacity < self.high_water:
                capacity *= 2
            for table in self._tables:
                table.grow(capacity)
        return np.concatenate([np.array(reused, dtype=np.int64), fresh])

    def _commit(self, record: dict[str, np.ndarray]) -> None:
        version = self.version + 1
        self._wal.append(version, encode_arrays(record))
        self._apply(record)
        self.version = version
        if self._wal.path.stat().st_size > _CHECKPOINT_WAL_BYTES:
            self._checkpoint_held()

    def _apply(self, record: dict[str, np.ndarray]) -> None:
        """Apply one WAL record to the tables (idempotent: replay may apply it again)."""
        op, ids = str(record["op"]), record["ids"]
        high_water = int(record["high_water"])
        if high_water > self.keys.capacity:
            capacity = max(self.keys.capacity, 1)
            while capacity < high_water:
                capacity *= 2
            for table in self._tables:
                table.grow(capacity)
        self.high_water = max(self.high_water, high_water)
        if op == "write":
            self.keys.array[ids] = record["keys"]
            self.values.array[ids] = record["values"]
            self.owners.array[ids] = record["owners"]
            # Records written before second keys existed carry none.
            self.relations.array[ids] = record["relations"] if "relations" in record else 0
            self.relation_maps.array[ids] = record.get("relation_maps", 0)
        elif op == "values":
            self.values.array[ids] = record["values"]
        elif op == "free":
            # Values stay: an engine still on an older version may read them until it
            # refreshes (the row is quarantined until then, and overwritten when reused).
            self.owners.array[ids] = FREE
        else:
            raise StoreCorrupted(f"unknown WAL op {op!r}")

    def checkpoint(self) -> None:
        """Make the tables durable, record the version, and empty the WAL."""
        with self._writing():  # caught up first: a handle that lags must not empty newer records
            self._checkpoint_held()

    def _checkpoint_held(self) -> None:
        """`checkpoint`, for a caller that holds the writer lock (or creates the store)."""
        with self._lock:
            for table in self._tables:
                table.flush()
            _write_json_atomic(self.path / "meta.json", {
                "version": self.version, "high_water": self.high_water,
                "capacity": self.keys.capacity,
            })
            self._wal.reset(self.version)

    @contextmanager
    def _writing(self):
        """One writer at a time, in this process (RLock) and across processes (flock)."""
        with self._lock:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                self._catch_up()
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    # ---- other processes' writes ------------------------------------------------------------

    def refresh(self) -> bool:
        """Pick up writes that other processes committed; returns whether anything changed."""
        with self._lock:
            fcntl.flock(self._lock_file, fcntl.LOCK_SH)
            try:
                return self._catch_up()
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _catch_up(self) -> bool:
        meta = _read_json_checked(self.path / "meta.json")
        before = self.version
        if meta["version"] > self.version:
            # Another process checkpointed past us: its WAL no longer holds what we missed.
            for table in self._tables:
                table.grow(meta["capacity"])
            self.version, self.high_water = meta["version"], meta["high_water"]
            self._replay_wal(meta["version"], update_index=False)
            self._rebuild_free_list()
            self._index = self._build_index()
            return True
        self._replay_wal(meta["version"], update_index=True)
        if self.version != before:
            self._rebuild_free_list()
            self._switch_index_if_outgrown()
        return self.version != before

    def _replay_wal(self, checkpoint: int, update_index: bool) -> None:
        """Apply the WAL records newer than this store's version, in order."""
        for version, payload in self._wal.records_after(self.version, checkpoint):
            record = decode_arrays(payload)
            self._apply(record)
            self.version = version
            if update_index:
                self._apply_to_index(record)

    def _switch_index_if_outgrown(self) -> None:
        """An "auto" index searched exactly becomes approximate once the store grows past
        the threshold while open (memorizing or another process's writes), not only at the
        next open. One rebuild per process, under the store's locks: searches wait a few
        seconds at 100,000 keys. Its cells are sized for the store at that moment; they are
        sized again at the next open."""
        cfg = self.cfg.index
        threshold = max(cfg.auto_ivf_min, ix.MIN_APPROXIMATE)  # below it, build stays exact
        if cfg.kind == "auto" and len(self) >= threshold and self.index_kind == "flat":
            self._index = self._build_index()

    def _apply_to_index(self, record: dict[str, np.ndarray]) -> None:
        op = str(record["op"])
        if op == "write":
            ix.remove(self._index, record["ids"])
            ix.add(self._index, record["keys"], record["ids"])
        elif op == "free":
            ix.remove(self._index, record["ids"])

    # ---- checks -----------------------------------------------------------------------------

    def _check_keys(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.cfg.d_k:
            raise ValueError(f"keys must have shape (n, {self.cfg.d_k}), got {keys.shape}")
        if not np.isfinite(keys).all():
            raise ValueError("keys must be finite")
        return keys

    def _check_values(self, values: np.ndarray, n: int) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=self.cfg.value_dtype)
        if values.shape != (n, *self.cfg.value_shape):
            raise ValueError(f"values must have shape ({n}, *{self.cfg.value_shape}), "
                             f"got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("values must be finite")
        return values

    def _check_allocated(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= self.high_water)]
        if len(bad) or (self.owner_of(ids) == FREE).any():
            raise KeyError(f"experts not allocated: {ids[(ids < 0) | (ids >= self.high_water)]}")
        return ids

    def close(self) -> None:
        self.checkpoint()
        self._wal.close()
        self._lock_file.close()
