"""Files written atomically and durably: small state files (group.json, bitmaps, the
journal's base) replaced without needing fresh space on a full file system (replace),
and one-off files (keys, certificates, manifests, reports: write_new).

The usual write-tmp-then-rename needs new blocks for the temporary file before the
old file's are freed, so on a full disk every checkpoint failed. Here each file has a
spare twin, `<name>.tmp`, that keeps its blocks: the new content is written over it in
place (never truncated below what it had: JSON and the base file are padded with
spaces to a multiple of 4 KiB, a bitmap always has the same size), fsync'd, and
renamed over the file; the old file, kept alive by a hard link made just before,
becomes the next spare. A new file gets its spare at once (while there is room).

Crash safety: `<name>` is at every moment either the old or the new complete content
(rename is atomic, the new content is durable before it). A crash while the spare is
written leaves only the spare damaged; one after the rename leaves the old content
under `<name>.old`, which the next replace takes back as its spare.
"""

from __future__ import annotations

import os
import tempfile

_PAGE = 4096


def replace(path: str, data: bytes, *, pad: bool = False) -> None:
    """Make `data` the content of `path`, atomically and durably. `pad`: the format
    ignores trailing spaces (JSON, whitespace-separated text), so the file may be
    longer than `data`."""
    spare, old = path + ".tmp", path + ".old"
    if os.path.exists(old):
        if os.path.exists(path) and os.path.samefile(old, path) or os.path.exists(spare):
            os.unlink(old)  # a link made before a crash, or a spare is there already
        else:
            os.replace(old, spare)  # a crash after the rename: the old file is the spare
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        have = os.fstat(fd).st_size
        if pad:
            size = max(have, -(-len(data) // _PAGE) * _PAGE)
            data = data + b" " * (size - len(data))
        view = memoryview(data)
        at = 0
        while at < len(view):
            at += os.pwrite(fd, view[at:], at)
        if have > len(data):
            os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    kept = os.path.exists(path)
    if kept:
        os.link(path, old)
    os.replace(spare, path)
    if kept:
        os.replace(old, spare)
    else:  # a new file: its spare gets its blocks now, while there is room
        _write(spare, data)
    fsync_dir(os.path.dirname(path) or ".")


def write_new(path: str, data: bytes, mode: int = 0o600) -> None:
    """Make `data` the content of `path`, atomically and durably: a temporary file,
    fsync, rename over `path`, fsync of the directory (the name is durable too)."""
    tmp = path + ".tmp"
    _write(tmp, data, mode)
    os.chmod(tmp, mode)  # whatever the umask or an older file said
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def create(path: str, data: bytes, mode: int = 0o600) -> bool:
    """Make `path` with `data` unless it exists, atomically and durably even while
    another process makes it too (a temporary file of this call's own, then a link to
    `path`, which only one of them gets): True if this call made it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        _write(tmp, data, mode)
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
    fsync_dir(os.path.dirname(path) or ".")
    return True


def _write(path: str, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        at = 0
        while at < len(view):
            at += os.pwrite(fd, view[at:], at)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
