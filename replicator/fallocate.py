"""Linux fallocate(2) with its mode flags (the os module has only posix_fallocate): what
keeps a journal segment's spare blocks and zeroes or punches a volume's range."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP)  # the file system has no such mode

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int, path: str = "") -> None:
    """fallocate(2); OSError (naming `path`) when it fails."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path or f"fd {fd}")
