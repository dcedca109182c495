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

    def append(self, version: int, payload: bytes) -> None:
        """Append one record and fsync it: once this returns, the write is committed."""
        header = _HEADER.pack(_MAGIC, version, len(payload), zlib.crc32(payload))
        self._file.write(header + payload)
        self._file.flush()
        os.fsync(self._file.fileno())

    def records(self) -> Iterator[tuple[int, bytes]]:
        """The intact records in order; stops at the first torn or corrupt one."""
        with open(self.path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + _HEADER.size <= len(data):
            magic, version, length, crc = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            payload = data[start:start + length]
            if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                break
            yield version, payload
            offset = start + length
        self._valid_bytes = offset

    def truncate_torn_tail(self) -> None:
        """Cut a torn tail (after `records()` was read to the end) so appends follow good data."""
        valid = getattr(self, "_valid_bytes", None)
        if valid is not None and valid < self.path.stat().st_size:
            self._file.truncate(valid)

    def reset(self) -> None:
        """Empty the log (after a checkpoint made its records durable in the tables)."""
        self._file.truncate(0)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
