"""Undo log of a replica being resynced: the content each region had before the resync
first overwrote it, so the last consistent image can be restored (`rollback`) when the
resync cannot finish because its source is lost.

A resync ships regions in bitmap order, not in write order, so while it runs the
replica is no prefix of the source's history (DESIGN.md invariant 1 makes that the one
exception). An entry is made durable (fdatasync) before the region is overwritten; a
region already saved is not saved again, so the log holds exactly the pre-resync image
of every region touched, however many passes or reconnections the resync took.

Entry layout (little-endian): magic "RUN1", volume name length u16, offset u64,
length u32, CRC32C u32 of the old data, volume name, old data. A torn last entry (a
crash while appending, before the overwrite it protects) is cut off when the log is
opened.
"""

from __future__ import annotations

import os
import struct

from crc32c import crc32c

MAGIC = b"RUN1"
_ENTRY = struct.Struct("<4sHQII")


class UndoError(Exception):
    pass


class UndoLog:
    def __init__(self, path: str):
        self.path = path
        self.fd = -1
        self.saved: set[tuple[str, int]] = set()  # (volume, offset) already in the log

    def open(self) -> None:
        """Open (creating) the log and index the entries it holds."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        end = 0
        for volume, offset, _, size in self._scan():
            self.saved.add((volume, offset))
            end += size
        if end < os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)

    def _scan(self):
        """(volume, offset, old data, entry size) of every complete entry, in order."""
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        pos = 0
        while pos + _ENTRY.size <= len(data):
            magic, n, offset, length, crc = _ENTRY.unpack_from(data, pos)
            end = pos + _ENTRY.size + n + length
            if magic != MAGIC:
                raise UndoError(f"{self.path}: damaged entry at offset {pos}")
            if end > len(data):
                break  # torn tail
            volume = data[pos + _ENTRY.size:pos + _ENTRY.size + n].decode()
            old = data[pos + _ENTRY.size + n:end]
            if crc32c(old) != crc:
                if end == len(data):
                    break  # torn tail
                raise UndoError(f"{self.path}: checksum mismatch in entry at offset {pos}")
            yield volume, offset, old, end - pos
            pos = end

    def save(self, entries: list[tuple[str, int, bytes]]) -> None:
        """Append (volume, offset, old data) entries not yet saved and make them durable."""
        parts = []
        for volume, offset, old in entries:
            if (volume, offset) in self.saved:
                continue
            raw = volume.encode()
            parts += [_ENTRY.pack(MAGIC, len(raw), offset, len(old), crc32c(old)), raw, old]
            self.saved.add((volume, offset))
        if parts:
            data = b"".join(parts)
            while data:
                data = data[os.write(self.fd, data):]
            os.fdatasync(self.fd)

    def entries_newest_first(self) -> list[tuple[str, int, bytes]]:
        return [(v, o, old) for v, o, old, _ in reversed(list(self._scan()))]

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.saved.clear()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
