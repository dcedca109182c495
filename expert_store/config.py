"""Configuration of an expert store, fixed when the store is created and saved beside it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class IndexConfig:
    # "flat": exact inner-product search (fine up to ~1M on a GPU, ~100k on this CPU).
    # "ivf": inverted lists over k-means cells; "hnsw": graph search. Both approximate.
    # "auto": flat below `auto_ivf_min` keys, IVF from there on (decided when a process opens
    # the store, and again when an open store grows past the threshold).
    kind: IndexKind = "flat"
    auto_ivf_min: int = 100_000
    ivf_cells: int = 0  # 0 = about 4 * sqrt(n) at build time
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = 80


@dataclass(frozen=True)
class StoreConfig:
    d_k: int  # routing key width
    value_shape: tuple[int, ...]  # shape of one expert's parameter block, chosen by the model layer
    value_dtype: str = "float32"
    initial_capacity: int = 1024  # the tables double when full
    index: IndexConfig = field(default_factory=IndexConfig)

    @property
    def value_numel(self) -> int:
        return math.prod(self.value_shape)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StoreConfig:
        return cls(d_k=data["d_k"], value_shape=tuple(data["value_shape"]),
                   value_dtype=data["value_dtype"], initial_capacity=data["initial_capacity"],
                   index=IndexConfig(**data["index"]))
