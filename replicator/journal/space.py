"""The journal's space, held from the start: a journal never finds its file system full.

Every segment has segment_size bytes allocated beyond its end (fallocate KEEP_SIZE, so
its size is still where its records end, and recovery reads it as before), and the file
`reserve` holds the rest of the reservation: capacity + 2 segments (what the records a
full journal keeps can span, see group/retention.py). A new segment takes its blocks
from `reserve`, a deleted one gives them back, and a cut (torn tail, failed batch)
allocates again what ftruncate released. Opening a journal whose reservation does not
fit raises JournalError: the operator learns at start, not when the disk is full. Only
a batch larger than a segment can still need fresh space (and fail ENOSPC, see Group).

Segments come on the event loop (`new_segment`) and go in a worker thread (`unlink`):
one lock guards the size of `reserve`.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable

from .. import fallocate as falloc
from .. import statefile


class JournalError(Exception):
    """Base error of the journal layer."""


class Space:
    def __init__(self, directory: str, *, reservation: int, segment_size: int,
                 segments: Callable[[], int]):
        self.directory = directory
        self.reservation = reservation
        self.segment_size = segment_size
        self._segments = segments  # how many segments the journal holds now
        self._fd = -1
        self._reserved = 0  # bytes `reserve` holds
        self._lock = threading.Lock()

    def open(self, segments: list[str]) -> None:
        """Hold the reservation: segment_size allocated in every segment, `reserve` the
        rest. After a crash this is what was held already, so it needs no fresh space."""
        self._fd = os.open(os.path.join(self.directory, "reserve"), os.O_RDWR | os.O_CREAT,
                           0o600)
        self._reserved = os.fstat(self._fd).st_size
        want = max(0, self.reservation - self._held())
        if self._reserved > want:
            self._resize(want)
        for path in segments:
            fd = os.open(path, os.O_WRONLY)
            try:
                self.preallocate(fd, path)
            finally:
                os.close(fd)
        if self._reserved < want:
            self._resize(want)

    def has_room(self) -> bool:
        """A new segment would be served from the reserved space."""
        return self._reserved >= self.segment_size

    def new_segment(self, path: str) -> int:
        """Create segment `path` (appended to) with blocks out of `reserve`, its name
        durable; its descriptor. OSError(ENOSPC) when neither `reserve` nor the file
        system has them."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with self._lock:
                self._resize(max(0, self._reserved - self.segment_size))
                self.preallocate(fd, path)
            statefile.fsync_dir(self.directory)
        except (OSError, JournalError) as exc:
            os.close(fd)
            os.unlink(path)
            if isinstance(exc, JournalError):
                raise OSError(errno.ENOSPC, str(exc)) from None
            raise
        return fd

    def cut(self, fd: int, path: str, size: int) -> None:
        """Cut a segment back to `size` and allocate again the blocks ftruncate freed
        past it (which nobody else had time to take; if somebody did, the segment
        simply has fewer spare blocks)."""
        os.ftruncate(fd, size)
        try:
            self.preallocate(fd, path)
        except OSError:
            pass

    def unlink(self, paths: list[str]) -> None:
        """Remove segments the journal let go of and give their blocks back to
        `reserve` (without growing it past the reservation: a segment may have been
        made without them)."""
        with self._lock:
            for path in paths:
                os.unlink(path)
                want = min(self._reserved + self.segment_size,
                           max(0, self.reservation - self._held()))
                if want > self._reserved:
                    try:
                        self._resize(want)
                    except JournalError:
                        pass  # taken by someone else meanwhile: the next open says so

    def preallocate(self, fd: int, path: str) -> None:
        """Keep segment_size bytes allocated in a segment past its end."""
        try:
            falloc.fallocate(fd, falloc.KEEP_SIZE, 0, self.segment_size, path)
        except OSError as exc:
            if exc.errno not in falloc.UNSUPPORTED:  # no fallocate: no reservation
                raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _held(self) -> int:
        """Bytes the segments hold outside `reserve`."""
        return self._segments() * self.segment_size

    def _resize(self, size: int) -> None:
        try:
            if size < self._reserved:
                os.ftruncate(self._fd, size)
            elif size > self._reserved:
                os.posix_fallocate(self._fd, self._reserved, size - self._reserved)
        except OSError as exc:
            os.ftruncate(self._fd, self._reserved)
            fs = os.fstatvfs(self._fd)
            raise JournalError(
                f"journal {self.directory}: cannot reserve its {self.reservation} bytes "
                f"(journal_size plus two segments): {exc.strerror}; the file system has "
                f"{fs.f_bavail * fs.f_frsize} bytes free") from None
        self._reserved = size
