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

The log is read one entry at a time (at open, to index it, and newest first by a
rollback); only the entries' file offsets and (volume, offset) keys stay in memory.
A replica that never held a consistent image (a new target's initial sync) writes no
entries: there is nothing to restore (see Group.has_image).
"""

from __future__ import annotations

import os
import struct
from array import array

from crc32c import crc32c

MAGIC = b"RUN1"
_ENTRY = struct.Struct("<4sHQII")
_READ_CHUNK = 64 << 20  # largest single pread (the kernel returns at most ~2 GiB)


class UndoError(Exception):
    pass


class UndoLog:
    def __init__(self, path: str):
        self.path = path
        self.fd = -1
        self.saved: set[tuple[str, int]] = set()  # (volume, offset) already in the log
        self._starts = array("Q")  # file offset of every entry, in order

    def open(self) -> None:
        """Open (creating) the log and index the entries it holds."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.saved.clear()
        del self._starts[:]
        end = 0
        for start, volume, offset, _length, size in self._scan():
            self.saved.add((volume, offset))
            self._starts.append(start)
            end = start + size
        if end < os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)

    def _pread(self, length: int, offset: int) -> bytes:
        """`length` bytes at `offset`, fewer only at the end of the file: one read
        returns at most about 2 GiB on Linux, whatever was asked."""
        parts, got = [], 0
        while got < length:
            chunk = os.pread(self.fd, min(length - got, _READ_CHUNK), offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _scan(self):
        """(file offset, volume, offset, length, entry size) of every complete entry, in
        order, checking each entry's checksum; the log is read one entry at a time
        (an entry holds one resync region), never whole."""
        size = os.fstat(self.fd).st_size
        pos = 0
        while pos + _ENTRY.size <= size:
            magic, n, offset, length, crc = _ENTRY.unpack(self._pread(_ENTRY.size, pos))
            end = pos + _ENTRY.size + n + length
            if magic != MAGIC:
                raise UndoError(f"{self.path}: damaged entry at offset {pos}")
            if end > size:
                break  # torn tail
            body = self._pread(n + length, pos + _ENTRY.size)
            if len(body) != n + length:
                break  # the file ended under us: torn tail
            if crc32c(memoryview(body)[n:]) != crc:
                if end == size:
                    break  # torn tail
                raise UndoError(f"{self.path}: checksum mismatch in entry at offset {pos}")
            yield pos, _name(body[:n], self.path, pos), offset, length, end - pos
            pos = end

    def _entry(self, start: int) -> tuple[str, int, bytes]:
        magic, n, offset, length, crc = _ENTRY.unpack(self._pread(_ENTRY.size, start))
        body = self._pread(n + length, start + _ENTRY.size)
        old = body[n:]
        if magic != MAGIC or len(body) != n + length or crc32c(old) != crc:
            raise UndoError(f"{self.path}: damaged entry at offset {start}")
        return _name(body[:n], self.path, start), offset, old

    def save(self, entries: list[tuple[str, int, bytes]]) -> None:
        """Append (volume, offset, old data) entries not yet saved and make them durable."""
        parts = []
        at = os.fstat(self.fd).st_size
        for volume, offset, old in entries:
            if (volume, offset) in self.saved:
                continue
            raw = volume.encode()
            parts += [_ENTRY.pack(MAGIC, len(raw), offset, len(old), crc32c(old)), raw, old]
            self.saved.add((volume, offset))
            self._starts.append(at)
            at += _ENTRY.size + len(raw) + len(old)
        if parts:
            data = memoryview(b"".join(parts))
            while data:
                data = data[os.write(self.fd, data):]
            os.fdatasync(self.fd)

    def entries_newest_first(self):
        """(volume, offset, old data) of every entry, newest first, read from the log
        one at a time (a generator: the log may be as large as the volumes)."""
        for start in reversed(self._starts):
            yield self._entry(start)

    def __len__(self) -> int:
        return len(self._starts)

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.saved.clear()
        del self._starts[:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _name(raw: bytes, path: str, start: int) -> str:
    """An entry's volume name (which its checksum does not cover: it is only over the old
    data); a name that is not UTF-8 is a damaged entry."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise UndoError(f"{path}: damaged entry at offset {start} (its volume name is not "
                        "UTF-8)") from None
