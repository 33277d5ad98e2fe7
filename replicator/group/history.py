"""A secondary's history: what it needs to go back from its volumes' image to any
earlier consistent seq of its window (`retain`), and where its applies stand.

A secondary with `retain` or `apply_delay` applies the journal to its volumes in steps
(group/applier.py). Before a step overwrites anything, the content each of its records
is about to overwrite (its before-image) is appended here with the record's seq, then
a step end entry, and the file is made durable (fdatasync); only then are the volumes
written. So:

- the image after any seq P of the window is the volumes' image with the before-images
  of the records after P written back, newest first (undo): each byte ends as it was
  before the oldest overwrite after P, which is what it held at P. Writing them back
  onto a partly undone or partly written-back image ends the same way, so an undo that
  a crash interrupted is simply done again (group/core.py, rewind.json);
- the last step end is where the volumes stand after a crash: its records were durable
  in the journal before the step began, so recovery replays through it and no further
  (the records after it were never applied; the delay still holds for them).

Without `retain` only step ends are written (the delay needs nothing to go back).

Files: history/<first seq, 20 digits>.hist, each starting after the previous file's
last step; the window is dropped oldest file first. Entry layout (little-endian):
magic "RHI1", CRC32C u32 of what follows it, seq u64, time_ns u64 (the record's, from
the primary), offset u64, length u32, name length u16, the volume name, then `length`
bytes of before-image. A step end has no name and no length. A torn or corrupt tail
(a crash while appending) is cut back to the last step end when the file is opened.

Only the entries' file offsets and seqs stay in memory (16 bytes an entry).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from array import array
from bisect import bisect_right

from crc32c import crc32c

from .. import statefile
from ..journal.record import Kind
from .memtable import Memtable

MAGIC = b"RHI1"
_HEAD = struct.Struct("<4sIQQQIH")
_CRC_FROM = 8
_PIECE = 16 << 20  # the before-image of a long ZERO goes in pieces of this size
FILE_BYTES = 64 << 20  # a file is closed at the first step end past this size
UNDO_READ = 8 << 20  # bytes of entries an undo reads at once


class HistoryError(Exception):
    pass


class _File:
    __slots__ = ("path", "first_seq", "seqs", "starts", "size", "last_seq", "first_time",
                 "last_time", "began")

    def __init__(self, path: str, first_seq: int):
        self.path = path
        self.first_seq = first_seq  # its entries are for seqs from this one on
        self.seqs = array("Q")  # seq of each before-image entry, in order
        self.starts = array("Q")  # its file offset
        self.size = 0  # through its last step end
        self.last_seq = first_seq - 1  # its last step end
        self.first_time = self.last_time = 0  # first: its low point's (0: not known)
        self.began = 0  # what its time span counts from: first_time, else its first step's


class History:
    def __init__(self, directory: str, *, images: bool, file_bytes: int = FILE_BYTES,
                 file_seconds: float = 0):
        self.directory = directory
        self.images = images  # False: step ends only (apply_delay without retain)
        # A file is closed at the first step end past this size or time span: the window
        # is dropped a file at a time, so a file is a small part of it.
        self.file_bytes = file_bytes
        self.file_ns = int(file_seconds * 1e9)
        self._files: list[_File] = []
        self._fd = -1  # the last file's, appending
        self._readers: dict[str, int] = {}
        self._lock = threading.RLock()  # appends and trims run in worker threads
        self.pins = 0  # rewinds reading it: nothing is dropped meanwhile

    # ---- opening --------------------------------------------------------------------
    def open(self) -> int | None:
        """Index the files (cutting a torn tail); returns the seq the volumes were last
        applied through (the last step end), or None when there is no history yet."""
        os.makedirs(self.directory, exist_ok=True)
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".hist"))
        for name in names:
            f = _File(os.path.join(self.directory, name), int(name[:-5]))
            self._scan(f)
            if self._files and f.first_seq != self._files[-1].last_seq + 1:
                self._drop_before_gap(f)
            self._files.append(f)
        if not self._files:
            return None
        last = self._files[-1]
        self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
        if os.fstat(self._fd).st_size != last.size:
            os.truncate(last.path, last.size)  # a step the crash tore: never applied
            os.fsync(self._fd)
        return last.last_seq if last.size else last.first_seq - 1

    def _drop_before_gap(self, f: _File) -> None:
        """`f` does not follow the files before it (a drop or a clear that a crash left
        half done): they are no window of these volumes any more."""
        for old in self._files:
            os.unlink(old.path)
        self._files.clear()
        statefile.fsync_dir(self.directory)

    def _scan(self, f: _File) -> None:
        seqs, starts = array("Q"), array("Q")
        with open(f.path, "rb") as fh:
            pos = 0
            while True:
                head = fh.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    break
                magic, crc, seq, time_ns, offset, length, name_len = _HEAD.unpack(head)
                body = fh.read(name_len + length)
                if magic != MAGIC or len(body) != name_len + length or \
                        crc32c(body, crc32c(head[_CRC_FROM:])) != crc:
                    break
                if pos == 0:  # the step end the file starts after: the window's low point
                    f.first_time = time_ns
                if name_len:
                    seqs.append(seq)
                    starts.append(pos)
                else:  # a step end: everything before it is whole
                    f.seqs.extend(seqs)
                    f.starts.extend(starts)
                    del seqs[:], starts[:]
                    f.size, f.last_seq, f.last_time = pos + _HEAD.size, seq, time_ns
                    f.began = f.began or time_ns
                pos += _HEAD.size + name_len + length

    def start_at(self, seq: int, time_ns: int) -> None:
        """The volumes hold the image after `seq` and nothing before it can be gone back
        to (a new history, or one a resync made void): one step end in a new file."""
        with self._lock:
            os.makedirs(self.directory, exist_ok=True)  # (remove() took it: a promote)
            self.clear()
            self._new_file(seq + 1, time_ns)

    def clear(self) -> None:
        """Forget the whole window (a resync rewrites the volumes outside it)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            for f in self._files:
                self._close_reader(f.path)
                os.unlink(f.path)
            self._files.clear()
            statefile.fsync_dir(self.directory)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for path in list(self._readers):
            self._close_reader(path)

    def remove(self) -> None:
        """No history any more (the group left the secondary role, or the keys went)."""
        self.clear()
        self.close()
        try:
            os.rmdir(self.directory)
        except OSError:
            pass

    # ---- the step ----------------------------------------------------------------------
    def save(self, through: int, time_ns: int, records, volumes=None) -> None:
        """Worker thread: append the before-images of `records` (Record tuples, applied
        next; those that change nothing need none), then the step end at `through`,
        durably. A record's before-image is what `volumes` hold with the step's earlier
        records laid over it. The volumes may be written once this returns."""
        bufs, entries, at = [], [], 0
        earlier = Memtable()  # the step's records before each one: the volumes lack them
        if self.images:
            for rec in records:
                if rec.kind not in (Kind.WRITE, Kind.ZERO):
                    continue
                vol = volumes[rec.volume]
                name = rec.volume.encode()
                done = 0
                while done < rec.length:
                    n = min(_PIECE, rec.length - done)
                    old = earlier.overlay(rec.volume, rec.offset + done,
                                          vol.read(rec.offset + done, n))
                    entries.append((rec.seq, at))
                    bufs += (_entry(rec.seq, rec.time_ns, rec.offset + done, name, old), name,
                             old)
                    at += _HEAD.size + len(name) + n
                    done += n
                earlier.add(rec.seq, ((rec.seq, rec.volume, rec.offset, rec.length,
                                       rec.payload if rec.kind is Kind.WRITE else None),))
        bufs.append(_entry(through, time_ns, 0, b"", b""))
        at += _HEAD.size
        with self._lock:
            if not self._files:
                raise HistoryError("the history was cleared (a resync began)")
            f = self._files[-1]
            self._append(f, bufs, at, entries, through, time_ns)
            if f.size >= self.file_bytes or \
                    self.file_ns and time_ns - f.began >= self.file_ns:
                self._new_file(through + 1, time_ns)

    def _append(self, f: _File, bufs: list, nbytes: int, entries: list, through: int,
                time_ns: int) -> None:
        """Under the lock: one step's entries (then its end) appended to `f`, durably."""
        base = f.size
        try:
            written = sum(os.writev(self._fd, bufs[i:i + 1000])
                          for i in range(0, len(bufs), 1000))
            if written != nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.path)  # a short write
            os.fdatasync(self._fd)
        except OSError:
            os.ftruncate(self._fd, base)  # no step: its volumes are not written
            raise
        for seq, pos in entries:
            f.seqs.append(seq)
            f.starts.append(base + pos)
        f.size = base + nbytes
        f.last_seq, f.last_time = through, time_ns
        f.began = f.began or time_ns

    def _new_file(self, first_seq: int, time_ns: int) -> None:
        """A file that starts with the step end at first_seq - 1 (its time is the time of
        the window's low point once the files before it are dropped)."""
        if self._fd >= 0:
            os.close(self._fd)
        path = os.path.join(self.directory, f"{first_seq:020d}.hist")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        statefile.fsync_dir(self.directory)
        f = _File(path, first_seq)
        f.first_time = time_ns
        self._files.append(f)
        self._append(f, [_entry(first_seq - 1, time_ns, 0, b"", b"")], _HEAD.size, [],
                     first_seq - 1, time_ns)

    def cut_after(self, seq: int, time_ns: int) -> None:
        """Forget the before-images of records after `seq` (the volumes were taken back
        to it): they are saved again when those records are applied again."""
        if not self._files or seq < self.low_seq:
            self.start_at(seq, time_ns)
            return
        with self._lock:
            while self._files[-1].first_seq > seq + 1:
                f = self._files.pop()
                self._close_reader(f.path)
                os.unlink(f.path)
            os.close(self._fd)
            f = self._files[-1]
            self._fd = os.open(f.path, os.O_WRONLY | os.O_APPEND)
            keep = bisect_right(f.seqs, seq)
            if keep < len(f.seqs):
                f.size = f.starts[keep]
                del f.seqs[keep:], f.starts[keep:]
            os.ftruncate(self._fd, f.size)
        self.save(seq, time_ns, [])  # the volumes' new place

    # ---- the window --------------------------------------------------------------------
    @property
    def applied_seq(self) -> int:
        """The last step end: the volumes hold the image after it, or are being brought
        to it."""
        return self._files[-1].last_seq

    @property
    def low_seq(self) -> int:
        """The oldest seq the volumes can be taken back to (its window's start)."""
        return self._files[0].first_seq - 1 if self._files else 0

    @property
    def low_time_ns(self) -> int:
        """When the primary journaled the window's low point (0: not known, as for seq 0
        or after a resync)."""
        return self._files[0].first_time if self._files else 0

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self._files)

    def files(self) -> list[tuple[int, int, int]]:
        """(last seq, last time_ns, bytes) of each file, oldest first."""
        return [(f.last_seq, f.last_time, f.size) for f in self._files]

    def drop_oldest(self, count: int = 1) -> bool:
        """Drop the `count` oldest files (never the one appended to); False if none was
        (pinned by a rewind, or only one file)."""
        with self._lock:
            count = min(count, len(self._files) - 1)
            if count < 1 or self.pins:
                return False
            for f in self._files[:count]:  # oldest first, each unlink durable before the
                self._close_reader(f.path)  # next: a power loss never leaves a gap
                os.unlink(f.path)
                statefile.fsync_dir(self.directory)
            del self._files[:count]
            return True

    # ---- going back ------------------------------------------------------------------
    def undo(self, after_seq: int, from_seq: int, write) -> int:
        """Write back the before-images of the records after `after_seq` through
        `from_seq`, newest first, through write(volume name, offset, data); returns the
        bytes written. Any thread; pin() first so nothing is dropped meanwhile."""
        if after_seq < self.low_seq:
            raise HistoryError(f"seq {after_seq} is before the window (it starts at "
                               f"{self.low_seq})")
        total = 0
        for f in reversed(list(self._files)):
            if f.last_seq <= after_seq:
                break
            lo, hi = bisect_right(f.seqs, after_seq), bisect_right(f.seqs, from_seq)
            if lo < hi:
                total += self._undo_file(f, lo, hi, write)
        return total

    def _undo_file(self, f: _File, lo: int, hi: int, write) -> int:
        """Entries lo..hi-1 of `f`, newest first. They are a contiguous stretch of the
        file: read backwards in blocks of up to UNDO_READ (the kernel's readahead does
        not follow a walk backwards entry by entry: each would be a synchronous disk
        read), after a hint to read it all ahead."""
        fd = self._reader(f.path)
        end = f.starts[hi] if hi < len(f.starts) else f.size
        os.posix_fadvise(fd, f.starts[lo], end - f.starts[lo], os.POSIX_FADV_WILLNEED)
        total, i = 0, hi - 1
        while i >= lo:
            j = i  # the block: entries j..i, within UNDO_READ (one entry at least)
            while j > lo and end - f.starts[j - 1] <= UNDO_READ:
                j -= 1
            start = f.starts[j]
            block = memoryview(os.pread(fd, end - start, start))
            if len(block) != end - start:
                raise HistoryError(f"{f.path}: short read at offset {start}")
            for k in range(i, j - 1, -1):
                at = f.starts[k] - start
                head = block[at:at + _HEAD.size]
                _, crc, _, _, offset, length, name_len = _HEAD.unpack(head)
                body = block[at + _HEAD.size:at + _HEAD.size + name_len + length]
                if len(body) != name_len + length or \
                        crc32c(body, crc32c(head[_CRC_FROM:])) != crc:
                    raise HistoryError(f"{f.path}: the entry of seq {f.seqs[k]} at offset "
                                       f"{f.starts[k]} is corrupt")
                write(bytes(body[:name_len]).decode(), offset, body[name_len:])
                total += length
            end, i = start, j - 1
        return total

    def pin(self) -> None:
        with self._lock:
            self.pins += 1

    def unpin(self) -> None:
        with self._lock:
            self.pins -= 1

    def _reader(self, path: str) -> int:
        fd = self._readers.get(path)
        if fd is None:
            fd = self._readers[path] = os.open(path, os.O_RDONLY)
        return fd

    def _close_reader(self, path: str) -> None:
        fd = self._readers.pop(path, None)
        if fd is not None:
            os.close(fd)


def _entry(seq: int, time_ns: int, offset: int, name: bytes, old: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, 0, seq, time_ns, offset, len(old), len(name))
    crc = crc32c(old, crc32c(name, crc32c(head[_CRC_FROM:])))
    return head[:4] + struct.pack("<I", crc) + head[_CRC_FROM:]
