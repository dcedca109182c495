"""The stored rows a batch in flight has changed, as they were, kept on disk.

A batch raises stored neighbours' gates and may retrain their values together with its own
facts. A batch that fails is rolled back in memory (model/memorize.py); a process killed
mid-batch leaves only its new experts (freed at recovery, as their facts were never
recorded) and these changed rows, which would then answer without the experts they were
trained beside. So the rows are written here, fsynced, before the store is touched, and put
back at recovery (server/worker.py) when none of the batch's facts got an outcome.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE_NAME = "batch-in-flight.npz"


@dataclass
class Rows:
    """Store rows as they were (keys, values, owners, second keys), to put them back."""

    ids: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    owners: np.ndarray
    # Kept in memory only: the journal's rows are put back in place (store.write_keys keeps
    # a row's second key); set-aside rows come back under new ids and need theirs, and the
    # relation map each compares through.
    relations: np.ndarray | None = None
    relation_maps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def only(self, mask: np.ndarray) -> Rows:
        return Rows(self.ids[mask], self.keys[mask], self.values[mask], self.owners[mask],
                    *(None if a is None else a[mask] for a in (self.relations, self.relation_maps)))

    def plus(self, other: Rows) -> Rows:
        """These rows and those of `other` not among them (the first copy of a row is the
        one from before the batch)."""
        new = ~np.isin(other.ids, self.ids)
        second = [None if a is None or b is None else np.concatenate([a, b[new]])
                  for a, b in ((self.relations, other.relations),
                               (self.relation_maps, other.relation_maps))]
        return Rows(*(np.concatenate([a, b[new]]) for a, b in
                      ((self.ids, other.ids), (self.keys, other.keys),
                       (self.values, other.values), (self.owners, other.owners))),
                    *second)


class BatchJournal:
    def __init__(self, directory: Path):
        self.path = Path(directory) / FILE_NAME

    def write(self, batch_owners: list[int], rows: Rows) -> None:
        """Replace the journal atomically: the batch's facts and the rows it changed."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, batch_owners=np.asarray(batch_owners, dtype=np.int64), ids=rows.ids,
                     keys=rows.keys, values=rows.values, owners=rows.owners)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def read(self) -> tuple[list[int], Rows] | None:
        if not self.path.exists():
            return None
        with np.load(self.path) as z:
            return (z["batch_owners"].tolist(),
                    Rows(z["ids"], z["keys"], z["values"], z["owners"]))

    def clear(self) -> None:
        """The batch's outcome is recorded (or it changed no stored row)."""
        if self.path.exists():
            self.path.unlink()
            _fsync_dir(self.path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
