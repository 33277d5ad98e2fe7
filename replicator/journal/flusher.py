"""Makes journal writes durable without blocking the event loop and without a thread.

The loop writes a batch itself (one writev into the page cache) and asks the Flusher
for an fdatasync of that file. The fdatasync runs as a Linux AIO request
(IOCB_CMD_FDSYNC, kernel 4.18+), executed by a kernel worker; its completion is
signalled on an eventfd that the loop watches. So a batch costs the loop one io_submit
and, later, one eventfd read plus one io_getevents: no thread hand-off, no GIL
contention between the loop and a commit worker (which cost more CPU per write than
the writes themselves).

Where AIO cannot be used (no io_setup in this kernel or sandbox, aio-max-nr
exhausted, or a kernel that refuses FDSYNC requests) the Flusher runs fdatasync on
one worker thread instead and says so in the log; the caller sees no difference.

Completions may arrive in any order; the caller orders them (Group does).

struct iocb (x86_64 and aarch64, little-endian), 64 bytes:
    u64 aio_data; u32 aio_key; u32 aio_rw_flags; u16 aio_lio_opcode; s16 aio_reqprio;
    u32 aio_fildes; u64 aio_buf; u64 aio_nbytes; s64 aio_offset; u64 aio_reserved2;
    u32 aio_flags; u32 aio_resfd
struct io_event, 32 bytes: u64 data; u64 obj; s64 res; s64 res2
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import platform
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

Callback = Callable[[int], None]  # called on the loop with 0 or an errno

_IOCB = struct.Struct("<QIIHhIQQqQII")
_EVENT = struct.Struct("<QQqq")
_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}  # setup destroy getevents submit
SLOTS = 64  # fdatasyncs in flight at most


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Flusher:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, log: logging.Logger,
                 use_aio: bool = True):
        self._loop = loop
        self._log = log
        self._callbacks: dict[int, Callback] = {}
        self._free = list(range(SLOTS))
        self._thread: ThreadPoolExecutor | None = None
        self._ctx = None
        why = self._setup_aio() if use_aio else "AIO not asked for"
        if why:
            self._use_thread(why)

    @property
    def mode(self) -> str:
        return "aio" if self._thread is None else "thread"

    def _setup_aio(self) -> str | None:
        nrs = _SYSCALLS.get(platform.machine())
        if nrs is None:
            return f"Linux AIO unavailable: no syscall table for {platform.machine()}"
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._nr_setup, self._nr_destroy, self._nr_getevents, self._nr_submit = nrs
        ctx = ctypes.c_ulong(0)
        if self._syscall(self._nr_setup, SLOTS, ctypes.byref(ctx)) != 0:
            return f"Linux AIO unavailable: io_setup: {os.strerror(ctypes.get_errno())}"
        self._ctx = ctypes.c_ulong(ctx.value)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocbs = ctypes.create_string_buffer(_IOCB.size * SLOTS)
        base = ctypes.addressof(self._iocbs)
        self._ptrs = [(ctypes.c_void_p * 1)(base + i * _IOCB.size) for i in range(SLOTS)]
        self._events = ctypes.create_string_buffer(_EVENT.size * SLOTS)
        self._zero = _Timespec(0, 0)
        self._loop.add_reader(self._efd, self._reap)
        return None

    def fdatasync(self, fd: int, callback: Callback) -> None:
        """Start an fdatasync of `fd`; `callback(err)` runs on the loop when it is done.
        At most SLOTS may be in flight."""
        if self._thread is not None:
            fut = self._loop.run_in_executor(self._thread, os.fdatasync, fd)
            fut.add_done_callback(lambda f: callback(_errno_of(f.exception())))
            return
        slot = self._free.pop()
        _IOCB.pack_into(self._iocbs, slot * _IOCB.size, slot, 0, 0, _IOCB_CMD_FDSYNC, 0, fd,
                        0, 0, 0, 0, _IOCB_FLAG_RESFD, self._efd)
        if self._syscall(self._nr_submit, self._ctx, 1, self._ptrs[slot]) != 1:
            err = ctypes.get_errno()
            self._free.append(slot)
            if err == errno.EINVAL and not self._callbacks:
                # A kernel older than 4.18 has no AIO fdatasync: use the thread from now on.
                self._close_aio()
                self._use_thread("this kernel refuses AIO fdatasync")
                self.fdatasync(fd, callback)
                return
            self._loop.call_soon(callback, err or errno.EIO)
            return
        self._callbacks[slot] = callback

    def _use_thread(self, why: str) -> None:
        self._log.warning("journal fdatasync runs on a worker thread (%s)", why)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fdatasync")

    def _reap(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        while self._callbacks:
            got = self._syscall(self._nr_getevents, self._ctx, 0, SLOTS, self._events,
                                ctypes.byref(self._zero))
            if got <= 0:
                if got < 0 and ctypes.get_errno() != errno.EINTR:
                    self._log.error("io_getevents: %s", os.strerror(ctypes.get_errno()))
                return
            for i in range(got):
                slot, _, res, _ = _EVENT.unpack_from(self._events, i * _EVENT.size)
                callback = self._callbacks.pop(slot)
                self._free.append(slot)
                callback(-res if res < 0 else 0)

    def close(self) -> None:
        """Once nothing is in flight (the group settled)."""
        if self._thread is not None:
            self._thread.shutdown()
        self._close_aio()

    def _close_aio(self) -> None:
        if self._ctx is None:
            return
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
        self._syscall(self._nr_destroy, self._ctx)
        self._ctx = None


def _errno_of(exc: BaseException | None) -> int:
    if exc is None:
        return 0
    return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
