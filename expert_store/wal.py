"""Write-ahead log: each committed store write is one checksummed record, fsynced before it is
applied to the tables. A record cut short by a crash fails its checksum and is dropped on load:
it was never committed, and it was never applied."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_MAGIC = b"MWAL"
_HEADER = struct.Struct("<4sQII")  # magic, version, payload length, crc32 of payload


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload)) as data:
        return {name: data[name] for name in data.files}


class WriteAheadLog:
    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "ab")
        # Where the last read stopped: (checkpoint, version, byte offset). A reader that follows
        # the log reads on from there instead of re-reading (and re-checksumming) up to 64 MiB
        # on every refresh.
        self._position: tuple[int, int, int] | None = None

    def append(self, version: int, payload: bytes) -> None:
        """Append one record and fsync it: once this returns, the write is committed."""
        header = _HEADER.pack(_MAGIC, version, len(payload), zlib.crc32(payload))
        end_before = os.fstat(self._file.fileno()).st_size
        self._file.write(header + payload)
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._position is not None and self._position[1:] == (version - 1, end_before):
            self._position = (self._position[0], version, end_before + len(header) + len(payload))

    def records_after(self, version: int, checkpoint: int) -> Iterator[tuple[int, bytes]]:
        """The intact records newer than `version`, in order.

        `checkpoint` is the version of the checkpoint the log was last emptied at (meta.json):
        while it and `version` are where the previous read stopped, nothing before that point
        can have changed, so reading resumes there. Read to the end to record the new position.
        """
        resume = self._position is not None and self._position[:2] == (checkpoint, version)
        start = self._position[2] if resume else 0
        last, end = version, start
        for record_version, payload, record_end in self._scan(start):
            if record_version > version:
                last = record_version
                yield record_version, payload
            end = record_end
        self._position = (checkpoint, last, end)

    def _scan(self, start: int) -> Iterator[tuple[int, bytes, int]]:
        """(version, payload, end offset) of the intact records from byte `start` on; stops at
        the first torn or corrupt one."""
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read()
        base, offset = start, 0
        while offset + _HEADER.size <= len(data):
            magic, version, length, crc = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            payload = data[start:start + length]
            if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                break
            offset = start + length
            yield version, payload, base + offset
        self._valid_bytes = base + offset

    def truncate_torn_tail(self) -> None:
        """Cut a torn tail (after `records_after()` was read to the end) so appends follow good data."""
        valid = getattr(self, "_valid_bytes", None)
        if valid is not None and valid < self.path.stat().st_size:
            self._file.truncate(valid)

    def reset(self, checkpoint: int) -> None:
        """Empty the log (after checkpoint `checkpoint` made its records durable in the tables)."""
        self._file.truncate(0)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._position = (checkpoint, checkpoint, 0)

    def close(self) -> None:
        self._file.close()
