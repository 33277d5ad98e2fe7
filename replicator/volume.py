"""A volume: an image file (created at its configured size when missing) or a block
device (which must be at least the configured size). Reads and writes are positional
on one O_RDWR descriptor, so the loop and the group's io worker (resync, rollback)
never share a file offset.

An image file's blocks are allocated as `allocation` says (block devices ignore it):
    preallocate  every block is allocated at open (posix_fallocate) and stays allocated
                 (zeroing writes zeroes into place instead of punching a hole), so a
                 write journaled and replicated can never fail ENOSPC on this volume
    check        the file stays sparse, but open refuses a volume whose unallocated
                 blocks do not fit in the file system's free space right now
    sparse       no check: a full file system fails volume writes (the group then
                 halts its writes until they succeed again; see group/commit.py)

A watched volume (capture: watch) on its group's primary is a file that programs write
(capture/watch.py): the agent never creates, extends, allocates or writes it, so such a
Volume (`watched` says when) opens no descriptor of its own; its reads come from the
image the watcher gives it (`view`), zeroes past that image's end or without one. Once
the node is no longer the primary (demoted), the volume opens its file as any replica's
at its first use (`ensure_open`).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from contextlib import contextmanager
from typing import Callable

from . import fallocate as falloc
from . import statefile
from .config import ALLOCATIONS

_ZEROES = bytes(1 << 20)


class VolumeError(Exception):
    """A volume cannot be opened or does not match its configuration."""


class Volume:
    def __init__(self, name: str, path: str, size: int, allocation: str = "sparse"):
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {allocation!r}: expected one of {ALLOCATIONS}")
        self.name = name
        self.name_bytes = name.encode()
        self.path = path
        self.size = size
        self.allocation = allocation
        self.fd = -1
        self.is_block = False
        # capture: watch: true while this node is the group's primary (capture/watch.py)
        self.watched: Callable[[], bool] | None = None
        self._reads = -1  # the descriptor reads come from: self.fd, or a view's

    def open(self) -> None:
        if self.watched is not None and self.watched():
            return  # a watched primary's file: not ours to open (see view)
        self._open()
        self._reads = self.fd

    def ensure_open(self) -> int:
        """The volume's own descriptor: opened now if it was a watched primary's volume
        at open and is a replica's since (-1 while it is still the primary's)."""
        if self.fd < 0 and self.watched is not None and not self.watched():
            self.open()
        return self.fd

    def _open(self) -> None:
        exists = os.path.exists(self.path)
        if exists and stat.S_ISBLK(os.stat(self.path).st_mode):
            self.is_block = True
            self.fd = os.open(self.path, os.O_RDWR)
            actual = os.lseek(self.fd, 0, os.SEEK_END)
            if actual < self.size:
                self.close()
                raise VolumeError(f"volume {self.name}: block device {self.path} has "
                                  f"{actual} bytes, configured size is {self.size}")
            return
        if not exists:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        actual = os.fstat(self.fd).st_size
        # (a watched file shorter than its volume read as zeroes past its end: as a
        # replica's volume, it holds them)
        if not exists or actual == 0 or actual < self.size and self.watched is not None:
            os.ftruncate(self.fd, self.size)  # sparse
            # Durable, name included, before anything is journaled for it: a power loss
            # must not take away the file that checkpoints will say holds those writes.
            os.fsync(self.fd)
            statefile.fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        elif actual != self.size:
            self.close()
            raise VolumeError(f"volume {self.name}: {self.path} has {actual} bytes, "
                              f"configured size is {self.size} (resize it or fix the config)")
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _allocate(self) -> None:
        if self.allocation == "sparse":
            return
        st = os.fstat(self.fd)
        missing = max(0, self.size - st.st_blocks * 512)
        if self.allocation == "check":
            fs = os.fstatvfs(self.fd)
            free = fs.f_bavail * fs.f_frsize
            if missing > free:
                raise VolumeError(
                    f"volume {self.name}: {self.path} is sparse and {missing} of its bytes "
                    f"are not allocated, but its file system has only {free} bytes free; "
                    "free space, or use allocation: preallocate")
            return
        if missing:
            try:
                os.posix_fallocate(self.fd, 0, self.size)
            except OSError as exc:
                raise VolumeError(f"volume {self.name}: cannot allocate the {self.size} bytes "
                                  f"of {self.path} (allocation: preallocate): "
                                  f"{exc.strerror}") from None

    def view(self, fd: int | None) -> None:
        """Reads come from `fd` (an image of a watched file; -1: none, all zeroes) from
        now on, or again from the volume's own descriptor (None)."""
        self._reads = self.fd if fd is None else fd

    def read(self, offset: int, length: int) -> bytes:
        fd = self._reads if self._reads >= 0 else self.ensure_open()
        data = os.pread(fd, length, offset) if fd >= 0 else b""
        # a watched file may be shorter than the volume: zeroes past its end
        return data if len(data) == length else data + bytes(length - len(data))

    def forget(self) -> None:
        """Drop the volume's clean pages from the page cache after a bulk pass (resync,
        verify). Besides sparing the cache, this matters for speed: the large folios
        (up to 2 MiB) that reading caches over a sparse file make every later 4 KiB
        write into them about 5x dearer in CPU (17.7 vs 3.6 us here). It is the whole
        volume because readahead caches more than a read asked for and only folios
        wholly inside a range would be dropped."""
        if self._reads >= 0:
            os.posix_fadvise(self._reads, 0, self.size, os.POSIX_FADV_DONTNEED)

    @contextmanager
    def mapped(self, offset: int, length: int):
        """The range as it is in the page cache right now, without a copy (hashing a
        gigabyte reads it once instead of twice), unmapped again on exit."""
        if length == 0:
            yield memoryview(b"")
            return
        own = self.ensure_open()
        if self._reads != own or own < 0:  # a watched file's image: it may be short
            yield memoryview(self.read(offset, length))
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self._reads, offset + length - start, prot=mmap.PROT_READ, offset=start)
        view = memoryview(m)[offset - start:offset - start + length]
        try:
            yield view
        finally:
            view.release()
            m.close()

    def write(self, offset: int, data) -> None:
        fd = self.ensure_open()
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        """The range reads back as zeroes: a punched hole where the file system or
        device supports it, written zeroes otherwise. A preallocated image keeps its
        blocks (zeroed in place), so no later write of the range needs fresh space."""
        if length == 0:
            return
        self.ensure_open()
        mode = (falloc.ZERO_RANGE | falloc.KEEP_SIZE if self.allocation == "preallocate"
                and not self.is_block else falloc.PUNCH_HOLE | falloc.KEEP_SIZE)
        try:
            falloc.fallocate(self.fd, mode, offset, length, self.path)
            return
        except OSError as exc:
            if exc.errno not in (*falloc.UNSUPPORTED, errno.EINVAL):
                raise
        end = offset + length
        while offset < end:
            n = min(len(_ZEROES), end - offset)
            self.write(offset, memoryview(_ZEROES)[:n])
            offset += n

    def sync(self) -> None:
        if self.fd >= 0:  # a watched primary's volume has written nothing to sync
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._reads = -1
