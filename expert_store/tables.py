"""Host-memory tables of the store, backed by memory-mapped files that grow by doubling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class MappedTable:
    """A (capacity, *row_shape) array in a file; rows are read and written in place."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: str, capacity: int,
                 fill: float | int = 0):
        self.path = path
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.fill = fill
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        if not path.exists():
            self._create(capacity)
        size = path.stat().st_size
        if size % self.row_bytes:
            raise ValueError(f"{path} is {size} bytes, not a whole number of rows")
        self.array = self._map(size // self.row_bytes)

    def _create(self, capacity: int) -> None:
        """Made whole under a private name, then linked into place unless another process
        made it first (processes opening a store written before this table existed all
        create it at once): a file that exists is never truncated under another's map."""
        staged = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(staged, "wb") as f:
                f.truncate(capacity * self.row_bytes)
            if self.fill:
                self._map(capacity, staged)[:] = self.fill
            os.link(staged, self.path)
        except FileExistsError:
            pass  # theirs is kept
        finally:
            staged.unlink(missing_ok=True)

    def _map(self, rows: int, path: Path | None = None) -> np.memmap:
        return np.memmap(path or self.path, dtype=self.dtype, mode="r+", shape=(rows, *self.row_shape))

    @property
    def capacity(self) -> int:
        return self.array.shape[0]

    def grow(self, capacity: int) -> None:
        """Extend to at least `capacity` rows; new rows hold `fill`. Never shrinks the file:
        another process sharing it may have grown it further already."""
        old = self.capacity
        if capacity <= old:
            return
        self.array.flush()
        del self.array
        with open(self.path, "r+b") as f:
            on_disk = os.fstat(f.fileno()).st_size // self.row_bytes
            if on_disk < capacity:
                f.truncate(capacity * self.row_bytes)
                fill_from = on_disk
            else:
                capacity, fill_from = on_disk, None
        self.array = self._map(capacity)
        if self.fill and fill_from is not None:
            self.array[fill_from:] = self.fill

    def flush(self) -> None:
        self.array.flush()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
