"""A crash-simulating file layer for unit tests (like SQLite's test VFS and ALICE).

While a `CrashSim` is active, every file system call that changes a file under its
root is performed for real *and* recorded: the writes (`os.write`, `os.writev`,
`os.pwrite`, `os.pwritev`), `os.ftruncate`, `os.posix_fallocate`, the project's
`replicator.fallocate.fallocate`, `os.open` (creation, O_TRUNC), `os.fsync` and
`os.fdatasync` (on files and on directories), `os.replace`, `os.rename`, `os.link`,
`os.unlink` / `os.remove`. They are patched as attributes of the `os` module (and of
`replicator.fallocate`), which is what replicator/journal/segments.py and space.py, volume.py,
statefile.py and fallocate.py look up at every call, so nothing in the project changes.
A descriptor that did not come through `os.open` (the journal's recovery opens segments
with the builtin `open` and cuts them with `os.ftruncate(f.fileno())`) is identified by
its inode, so its truncates and fsyncs are seen too. What the layer cannot see are writes
through Python file objects (`f.write`): `Recording.verify(root)` replays everything that
was recorded and compares it with the real files, so a test finds out when a module
writes around the layer.

The Flusher (replicator/journal/flusher.py) does its fdatasync as a Linux AIO request
(io_submit through ctypes), which no patch of `os` can see: a journal would look as if
it were never synced. `CrashSim` therefore makes `Flusher._setup_aio` report AIO as
unavailable, so a Flusher built while it is active runs `os.fdatasync` on its worker
thread (use_aio=False does the same for a Flusher built by the test itself).

The model, replayed from the recording (`Recording.crash`):
  - per inode: the durable content (what the last completed fsync/fdatasync covered:
    every change recorded before that sync *started*) and the changes since;
  - per path: the durable directory entries and the namespace operations since
    (create, link, rename, unlink). A namespace operation is durable once its
    directory is fsync'd (the fsync of a file does not make its name durable).
At a simulated power loss (crash point N: the first N recorded calls happened, no later
one did) each file gets its durable content plus a random subset of the changes after
it, applied in the order they were made; a write is split into `block`-byte pieces
(aligned in the file) that persist independently, so a large write can be torn, and
pieces that never reached the disk read as what was there before (zeroes past the old
end of the file). A block holds what the page cache held for it at one moment (it is
written whole), so its pieces persist in order up to some point; across blocks, any
subset in any order. `block=0` persists each write whole or not at all, independently
(the literal "any subset of the writes"; it can give a sector states no disk gives: a
later write's bytes in it without an earlier one's).
The namespace keeps its durable entries plus, in `namespace="prefix"` mode (the
default; what journaling file systems like ext4 and XFS give: metadata commits in
order, so a directory's fsync also makes every earlier namespace operation durable), a
random prefix of the later operations, or in `namespace="subset"` mode (all that POSIX
promises: a directory's fsync makes only its own entries durable) any subset of them.
Directories themselves are never lost (mkdir is recorded, not modelled). A sync that
started but had not returned at the crash guarantees nothing. Files that existed under
the root before the CrashSim started count as durable.

Usage (a whole run is recorded once; any number of crash points are cut from it):

    with CrashSim(root) as sim:          # patches os.* for the block's duration
        workload()                       # may call sim.mark("flushed", seq)
    rec = sim.recording
    rec.verify(root)                     # the layer saw every change
    for point in range(len(rec) + 1):
        image = rec.crash(point, random.Random(point))
        image.materialize(somewhere)     # or image.files, image.marks

`run_and_crash` does it in one call for a test that reopens the files in place.
"""

from __future__ import annotations

import os
import random
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

from replicator import fallocate as falloc
from replicator.journal import flusher as flusher_mod

PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


class CrashSimError(Exception):
    """The layer was used wrongly or missed a change (see Recording.verify)."""


# ---- file contents ---------------------------------------------------------------------
class Sparse:
    """A file's content: its size and its non-zero pages (immutable bytes, so a copy is
    a shallow copy of the dict)."""

    __slots__ = ("size", "pages")

    def __init__(self, size: int = 0, pages: dict | None = None):
        self.size = size
        self.pages = pages if pages is not None else {}

    def copy(self) -> "Sparse":
        return Sparse(self.size, dict(self.pages))

    @classmethod
    def of(cls, data: bytes) -> "Sparse":
        s = cls()
        s.write(0, data)
        return s

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        pos, end = offset, offset + len(view)
        while pos < end:
            idx, at = divmod(pos, PAGE)
            n = min(PAGE - at, end - pos)
            old = self.pages.get(idx, _ZERO_PAGE)
            self.pages[idx] = old[:at] + bytes(view[pos - offset:pos - offset + n]) + old[at + n:]
            pos += n
        self.size = max(self.size, end)

    def zero(self, offset: int, length: int) -> None:
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            idx, at = divmod(pos, PAGE)
            n = min(PAGE - at, end - pos)
            old = self.pages.get(idx)
            if old is not None:
                page = old[:at] + bytes(n) + old[at + n:]
                if page == _ZERO_PAGE:
                    del self.pages[idx]
                else:
                    self.pages[idx] = page
            pos += n

    def truncate(self, size: int) -> None:
        if size < self.size:
            for idx in [i for i in self.pages if i * PAGE >= size]:
                del self.pages[idx]
            last, at = divmod(size, PAGE)
            if at and last in self.pages:
                self.pages[last] = self.pages[last][:at] + bytes(PAGE - at)
        self.size = size

    def bytes(self) -> bytes:
        out = bytearray(self.size)
        for idx, page in self.pages.items():
            at = idx * PAGE
            if at < self.size:
                out[at:at + PAGE] = page[:self.size - at]
        return bytes(out)

    def write_to(self, fd: int) -> None:
        os.ftruncate(fd, self.size)  # called with the real functions (layer inactive)
        for idx, page in self.pages.items():
            at = idx * PAGE
            if at < self.size:
                os.pwrite(fd, page[:self.size - at], at)


# ---- the recording ---------------------------------------------------------------------
# Events (tuples, first item the kind):
#   ("write", ino, offset, data)      ("zero", ino, offset, length)
#   ("truncate", ino, size)           ("grow", ino, size)        posix_fallocate
#   ("create", path, ino)             ("link", src, dst)
#   ("rename", src, dst)              ("unlink", path)
#   ("sync_start", token, ino)        ("dirsync_start", token, dirpath)
#   ("sync_end", token)               ("mkdir", path)
#   ("mark", label, value)            (not a call: no crash point of its own)
# Paths are relative to the root; inodes are the layer's own numbers.
_CONTENT = {"write", "zero", "truncate", "grow"}
_NAMESPACE = {"create", "link", "rename", "unlink"}


@dataclass
class CrashImage:
    """The files as a power loss left them: relative path -> content, plus the marks
    the workload made before the crash point."""
    point: int
    files: dict[str, Sparse]
    marks: list[tuple[str, object]]
    dirs: set[str] = field(default_factory=set)

    def data(self, path: str) -> bytes:
        return self.files[path].bytes()

    def last_mark(self, label: str, default=None):
        """The value of the last mark `label` made before the crash point."""
        for got, value in reversed(self.marks):
            if got == label:
                return value
        return default

    def materialize(self, root: str, *, clear: bool = True) -> None:
        """Write the image under `root` (emptied first unless clear=False), so the
        project can reopen it with its ordinary code."""
        with _suspended():
            if clear and os.path.isdir(root):
                _clear(root)
            os.makedirs(root, exist_ok=True)
            for d in sorted(self.dirs):
                os.makedirs(os.path.join(root, d), exist_ok=True)
            for rel, content in self.files.items():
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    content.write_to(fd)
                finally:
                    os.close(fd)


def _clear(root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))


class _Inode:
    __slots__ = ("durable", "pending", "base")

    def __init__(self, durable: Sparse):
        self.durable = durable
        self.pending: list[tuple] = []
        self.base = 0  # changes ever committed to `durable`

    def commit(self, upto: int) -> None:
        k = upto - self.base
        if k > 0:
            for ev in self.pending[:k]:
                _apply(self.durable, ev)
            del self.pending[:k]
            self.base = upto


def _apply(content: Sparse, ev: tuple) -> None:
    kind = ev[0]
    if kind == "write":
        content.write(ev[2], ev[3])
    elif kind == "zero":
        content.zero(ev[2], ev[3])
    elif kind == "truncate":
        content.truncate(ev[2])
    elif kind == "grow":
        if ev[2] > content.size:
            content.truncate(ev[2])


def _apply_ns(ns: dict, ev: tuple) -> None:
    kind = ev[0]
    if kind == "create":
        ns[ev[1]] = ev[2]
    elif kind == "link":
        if ev[1] in ns:
            ns[ev[2]] = ns[ev[1]]
    elif kind == "rename":
        if ev[1] in ns:
            ns[ev[2]] = ns.pop(ev[1])
    elif kind == "unlink":
        ns.pop(ev[1], None)


def _ns_dirs(ev: tuple) -> tuple[str, ...]:
    if ev[0] in ("link", "rename"):
        return os.path.dirname(ev[1]), os.path.dirname(ev[2])
    return (os.path.dirname(ev[1]),)


class _Model:
    """The durable state and the changes since, replayed event by event."""

    def __init__(self, initial: dict[str, bytes], dirs: set[str], namespace: str = "prefix"):
        if namespace not in ("prefix", "subset"):
            raise CrashSimError(f"namespace mode {namespace!r}: expected prefix or subset")
        self.namespace = namespace
        self.inodes: dict[int, _Inode] = {}
        self.ns: dict[str, int] = {}
        self.ns_pending: list[tuple] = []
        self.ns_base = 0
        self.syncs: dict[int, tuple] = {}
        self.marks: list[tuple[str, object]] = []
        self.dirs = set(dirs)
        for i, (rel, data) in enumerate(sorted(initial.items()), start=1):
            self.inodes[-i] = _Inode(Sparse.of(data))
            self.ns[rel] = -i

    def step(self, ev: tuple) -> None:
        kind = ev[0]
        if kind in _CONTENT:
            ino = self.inodes.get(ev[1])
            if ino is not None:
                ino.pending.append(ev)
        elif kind in _NAMESPACE:
            if kind == "create":
                self.inodes[ev[2]] = _Inode(Sparse())
                self.dirs.add(os.path.dirname(ev[1]))
            self.ns_pending.append(ev)
        elif kind == "sync_start":
            ino = self.inodes.get(ev[2])
            if ino is not None:
                self.syncs[ev[1]] = ("file", ev[2], ino.base + len(ino.pending))
        elif kind == "dirsync_start":
            self.syncs[ev[1]] = ("dir", ev[2], self.ns_base + len(self.ns_pending))
        elif kind == "sync_end":
            what = self.syncs.pop(ev[1], None)
            if what is None:
                return
            if what[0] == "file":
                self.inodes[what[1]].commit(what[2])
            else:
                self._commit_dir(what[1], what[2])
        elif kind == "mark":
            self.marks.append((ev[1], ev[2]))
        elif kind == "mkdir":
            self.dirs.add(ev[1])

    def _commit_dir(self, dirpath: str, upto: int) -> None:
        """A directory's fsync ended: its namespace operations made before the fsync
        started are durable. In "prefix" mode in order (a journaling file system
        commits metadata in order), so every operation before them is as well; in
        "subset" mode only the operations on that directory (a rename: on either)."""
        if self.namespace == "subset":
            keep = []
            for n, ev in enumerate(self.ns_pending, start=self.ns_base):
                if ev is not None and n < upto and dirpath in _ns_dirs(ev):
                    _apply_ns(self.ns, ev)
                    ev = None  # durable; its place keeps the later ones' numbers
                keep.append(ev)
            while keep and keep[0] is None:
                keep.pop(0)
                self.ns_base += 1
            self.ns_pending = keep
            return
        window = self.ns_pending[:upto - self.ns_base]
        last = -1
        for i, ev in enumerate(window):
            if ev is not None and dirpath in _ns_dirs(ev):
                last = i
        if last < 0:
            return
        for ev in self.ns_pending[:last + 1]:
            if ev is not None:
                _apply_ns(self.ns, ev)
        del self.ns_pending[:last + 1]
        self.ns_base += last + 1

    def image(self, point: int, rng: random.Random, *, block: int,
              persist: float | None) -> CrashImage:
        p = rng.choice((0.0, 1.0, rng.random(), rng.random())) if persist is None else persist
        ns = dict(self.ns)
        if self.namespace == "prefix":
            k = rng.randint(0, len(self.ns_pending))
            for ev in self.ns_pending[:k]:
                _apply_ns(ns, ev)
        else:
            for ev in self.ns_pending:
                if ev is not None and rng.random() < p:
                    _apply_ns(ns, ev)
        files: dict[str, Sparse] = {}
        made: dict[int, Sparse] = {}
        for rel, ino_id in sorted(ns.items()):
            content = made.get(ino_id)
            if content is None:
                content = made[ino_id] = self._persisted(self.inodes[ino_id], rng, p, block)
            files[rel] = content  # hard links share their content
        return CrashImage(point, files, list(self.marks), set(self.dirs))

    @staticmethod
    def _persisted(ino: _Inode, rng: random.Random, p: float, block: int) -> Sparse:
        """The durable content plus the unsynced changes that reached the disk. With
        block > 0 each block is written whole at some moment (a sector or a page at
        writeback): it holds its pieces of the changes up to some point in their order
        (every change after the first missing one is missing too), independently of
        the other blocks. With block == 0 each change persists whole or not at all,
        independently of the others. Size changes persist in order, up to some point."""
        content = ino.durable.copy()
        stopped: set = set()
        for i, ev in enumerate(ino.pending):
            for piece in _pieces(ev, block):
                key = ("size" if piece[0] in ("truncate", "grow") else
                       piece[2] // block if block > 0 else i)
                if key in stopped:
                    continue
                if rng.random() < p:
                    _apply(content, piece)
                else:
                    stopped.add(key)
        return content

    def everything(self) -> dict[str, bytes]:
        """The files as the running system sees them: every change applied."""
        ns = dict(self.ns)
        for ev in self.ns_pending:
            if ev is not None:
                _apply_ns(ns, ev)
        out = {}
        for rel, ino_id in ns.items():
            ino = self.inodes[ino_id]
            content = ino.durable.copy()
            for ev in ino.pending:
                _apply(content, ev)
            out[rel] = content.bytes()
        return out


def _pieces(ev: tuple, block: int) -> Iterable[tuple]:
    """A change as the pieces that reach the disk independently: a write or a zeroed
    range cut at `block` boundaries of the file; a size change whole."""
    if ev[0] not in ("write", "zero") or block <= 0:
        yield ev
        return
    kind, ino, offset = ev[0], ev[1], ev[2]
    length = len(ev[3]) if kind == "write" else ev[3]
    pos, end = offset, offset + length
    while pos < end:
        n = min(block - pos % block, end - pos)
        if kind == "write":
            yield ("write", ino, pos, ev[3][pos - offset:pos - offset + n])
        else:
            yield ("zero", ino, pos, n)
        pos += n


class Recording:
    """What a CrashSim saw: the calls in the order they were made."""

    def __init__(self, root: str, initial: dict[str, bytes], dirs: set[str]):
        self.root = root
        self.initial = initial
        self.initial_dirs = dirs
        self.events: list[tuple] = []
        self._calls: list[int] = []  # index in events after each recorded call

    def __len__(self) -> int:
        """Crash points are 0..len(self): after the first N recorded calls."""
        return len(self._calls)

    def _add(self, ev: tuple) -> None:
        self.events.append(ev)
        if ev[0] != "mark":
            self._calls.append(len(self.events))

    def call_at(self, point: int) -> tuple | None:
        """The call that made crash point `point` (None for point 0), for messages."""
        return self.events[self._calls[point - 1] - 1] if point else None

    def marks(self) -> list[tuple[int, str, object]]:
        """(crash point, label, value) of every mark: a crash at or after that point
        comes after the mark."""
        out, calls = [], 0
        for ev in self.events:
            if ev[0] == "mark":
                out.append((calls, ev[1], ev[2]))
            else:
                calls += 1
        return out

    def crash(self, point: int, rng: random.Random, **kw) -> CrashImage:
        """The image a power loss after the first `point` calls leaves."""
        return next(self.crashes([point], rng, **kw))

    def crashes(self, points: Iterable[int], rng: random.Random, *, block: int = 512,
                namespace: str = "prefix", persist: float | None = None):
        """Yield the crash image at each point (any order given, yielded in increasing
        order), replaying the recording once. `block`: the unit a write is torn into
        (0: writes persist whole). `persist`: the chance that one unsynced change
        persists (default: drawn per crash, often 0 or 1)."""
        model = _Model(self.initial, self.initial_dirs, namespace)
        done = 0
        for point in sorted(set(points)):
            if not 0 <= point <= len(self):
                raise CrashSimError(f"crash point {point} outside 0..{len(self)}")
            upto = self._calls[point - 1] if point else 0
            # Marks right after the last call before the crash still happened.
            while upto < len(self.events) and self.events[upto][0] == "mark":
                upto += 1
            for ev in self.events[done:upto]:
                model.step(ev)
            done = upto
            yield model.image(point, rng, block=block, persist=persist)

    def verify(self, root: str | None = None) -> None:
        """Raise CrashSimError if the real files under `root` differ from what the
        recording says they are: a change made around the layer."""
        root = root or self.root
        model = _Model(self.initial, self.initial_dirs)
        for ev in self.events:
            model.step(ev)
        want = model.everything()
        with _suspended():
            have = _snapshot(root)[0]
        if set(want) != set(have):
            raise CrashSimError(f"crashsim: files under {root} differ from the recording: "
                                f"unrecorded {sorted(set(have) - set(want))}, "
                                f"missing {sorted(set(want) - set(have))}")
        for rel in sorted(want):
            if want[rel] != have[rel]:
                raise CrashSimError(f"crashsim: {rel} under {root} differs from the "
                                    "recording (a write the layer did not see)")


def _snapshot(root: str) -> tuple[dict[str, bytes], set[str]]:
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != ".":
            dirs.add(rel_dir)
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files, dirs


# ---- the patches -------------------------------------------------------------------------
_REAL = {name: getattr(os, name) for name in (
    "open", "write", "writev", "pwrite", "pwritev", "ftruncate", "truncate",
    "fsync", "fdatasync", "replace", "rename", "link", "unlink", "remove",
    "posix_fallocate", "mkdir")}
_REAL_FALLOCATE = falloc.fallocate
_active: list["CrashSim"] = []
_lock = threading.RLock()


class _suspended:
    """Run with the real os functions (materializing, verifying)."""

    def __enter__(self):
        self._saved = [sim for sim in _active]
        for sim in reversed(self._saved):
            sim._unpatch()
        return self

    def __exit__(self, *exc):
        for sim in self._saved:
            sim._patch()


class CrashSim:
    """Records every change to files under `root` while active (a context manager;
    one at a time). `sim.mark(label, value)` puts a marker into the recording (say,
    "flush point acknowledged"), which crash images report if it came before them."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        files, dirs = _snapshot(self.root)
        self.recording = Recording(self.root, files, dirs)
        self._inos: dict[tuple[int, int], int] = {}
        self._next = 1
        self._tokens = 0
        for rel, ino_id in _Model(files, dirs).ns.items():  # what exists counts as durable
            st = os.stat(os.path.join(self.root, rel))
            self._inos.setdefault((st.st_dev, st.st_ino), ino_id)
        self._saved_setup_aio = None

    # -- lifecycle
    def __enter__(self) -> "CrashSim":
        if _active:
            raise CrashSimError("one CrashSim at a time")
        _active.append(self)
        self._patch()
        return self

    def __exit__(self, *exc) -> None:
        self._unpatch()
        _active.remove(self)

    def _patch(self) -> None:
        for name in _REAL:
            setattr(os, name, getattr(self, "_" + name))
        falloc.fallocate = self._fallocate
        self._saved_setup_aio = flusher_mod.Flusher._setup_aio
        flusher_mod.Flusher._setup_aio = _no_aio

    def _unpatch(self) -> None:
        for name, fn in _REAL.items():
            setattr(os, name, fn)
        falloc.fallocate = _REAL_FALLOCATE
        if self._saved_setup_aio is not None:
            flusher_mod.Flusher._setup_aio = self._saved_setup_aio

    def mark(self, label: str, value=None) -> None:
        with _lock:
            self.recording._add(("mark", label, value))

    # -- identifying files
    def _rel(self, path, dir_fd=None) -> str | None:
        if dir_fd is not None or isinstance(path, int):
            return None
        path = os.path.abspath(os.fsdecode(path))
        if path == self.root or path.startswith(self.root + os.sep):
            return os.path.relpath(path, self.root)
        return None

    def _ino_of_fd(self, fd: int) -> tuple[int | None, os.stat_result]:
        st = os.fstat(fd)
        return self._inos.get((st.st_dev, st.st_ino)), st

    def _record(self, ev: tuple) -> None:
        self.recording._add(ev)

    def _token(self) -> int:
        self._tokens += 1
        return self._tokens

    # -- creation and names
    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        rel = self._rel(path, dir_fd)
        if rel is None:
            return _REAL["open"](path, flags, mode, dir_fd=dir_fd)
        with _lock:
            existed = os.path.lexists(path)
            fd = _REAL["open"](path, flags, mode)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if not existed and flags & os.O_CREAT:
                    ino_id = self._next
                    self._next += 1
                    self._inos[key] = ino_id
                    self._record(("create", rel, ino_id))
                elif flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                    ino_id = self._inos.get(key)
                    if ino_id is not None:
                        self._record(("truncate", ino_id, 0))
            return fd

    def _names(self, kind, src, dst, real, **kw):
        rs, rd = self._rel(src, kw.get("src_dir_fd")), self._rel(dst, kw.get("dst_dir_fd"))
        if rs is None and rd is None:
            return real(src, dst, **kw)
        if rs is None or rd is None:
            raise CrashSimError(f"crashsim: {kind} across the root ({src} -> {dst})")
        with _lock:
            result = real(src, dst, **kw)
            self._record((kind, rs, rd))
            return result

    def _replace(self, src, dst, **kw):
        return self._names("rename", src, dst, _REAL["replace"], **kw)

    def _rename(self, src, dst, **kw):
        return self._names("rename", src, dst, _REAL["rename"], **kw)

    def _link(self, src, dst, **kw):
        return self._names("link", src, dst, _REAL["link"], **kw)

    def _unlink(self, path, *, dir_fd=None):
        rel = self._rel(path, dir_fd)
        if rel is None:
            return _REAL["unlink"](path, dir_fd=dir_fd)
        with _lock:
            _REAL["unlink"](path)
            self._record(("unlink", rel))

    def _remove(self, path, *, dir_fd=None):
        return self._unlink(path, dir_fd=dir_fd)

    def _mkdir(self, path, mode=0o777, *, dir_fd=None):
        rel = self._rel(path, dir_fd)
        _REAL["mkdir"](path, mode, dir_fd=dir_fd)
        if rel is not None:  # directories are never lost: see the module docstring
            with _lock:
                self._record(("mkdir", rel))

    # -- content
    def _cursor(self, fd):
        def at(st):
            if _fcntl_flags(fd) & os.O_APPEND:
                return st.st_size
            return os.lseek(fd, 0, os.SEEK_CUR)
        return at

    def _write(self, fd, data):
        def call():
            n = _REAL["write"](fd, data)
            return n, bytes(memoryview(data).cast("B"))
        return self._wrapped(fd, call, self._cursor(fd))

    def _writev(self, fd, buffers):
        buffers = list(buffers)

        def call():
            n = _REAL["writev"](fd, buffers)
            return n, b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        return self._wrapped(fd, call, self._cursor(fd))

    def _pwrite(self, fd, data, offset):
        def call():
            n = _REAL["pwrite"](fd, data, offset)
            return n, bytes(memoryview(data).cast("B"))
        return self._wrapped(fd, call, lambda st: offset)

    def _pwritev(self, fd, buffers, offset, *flags):
        buffers = list(buffers)

        def call():
            n = _REAL["pwritev"](fd, buffers, offset, *flags)
            return n, b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        return self._wrapped(fd, call, lambda st: offset)

    def _wrapped(self, fd, call, offset_fn):
        with _lock:
            ino_id, st = self._ino_of_fd(fd)
            if ino_id is None:
                return call()[0]
            offset = offset_fn(st)
            n, data = call()
            if n:
                self._record(("write", ino_id, offset, data[:n]))
            return n

    def _ftruncate(self, fd, length):
        with _lock:
            ino_id, _ = self._ino_of_fd(fd)
            _REAL["ftruncate"](fd, length)
            if ino_id is not None:
                self._record(("truncate", ino_id, length))

    def _truncate(self, path, length):
        if isinstance(path, int):
            return self._ftruncate(path, length)
        fd = self._open(path, os.O_WRONLY)
        try:
            self._ftruncate(fd, length)
        finally:
            os.close(fd)

    def _posix_fallocate(self, fd, offset, length):
        with _lock:
            ino_id, _ = self._ino_of_fd(fd)
            _REAL["posix_fallocate"](fd, offset, length)
            if ino_id is not None:
                self._record(("grow", ino_id, offset + length))

    def _fallocate(self, fd, mode, offset, length, path=""):
        with _lock:
            ino_id, st = self._ino_of_fd(fd)
            _REAL_FALLOCATE(fd, mode, offset, length, path)
            if ino_id is None:
                return
            if mode & (falloc.PUNCH_HOLE | falloc.ZERO_RANGE):
                self._record(("zero", ino_id, offset, length))
            if not mode & falloc.KEEP_SIZE and offset + length > st.st_size:
                self._record(("grow", ino_id, offset + length))

    # -- durability
    def _sync(self, fd, real):
        with _lock:
            ino_id, st = self._ino_of_fd(fd)
            token = None
            if stat.S_ISDIR(st.st_mode):
                rel = self._rel(os.readlink(f"/proc/self/fd/{fd}"))
                if rel is not None:
                    token = self._token()
                    self._record(("dirsync_start", token, "" if rel == "." else rel))
            elif ino_id is not None:
                token = self._token()
                self._record(("sync_start", token, ino_id))
        result = real(fd)  # outside the lock: other threads go on writing meanwhile
        if token is not None:
            with _lock:
                self._record(("sync_end", token))
        return result

    def _fsync(self, fd):
        if hasattr(fd, "fileno"):
            fd = fd.fileno()
        return self._sync(fd, _REAL["fsync"])

    def _fdatasync(self, fd):
        if hasattr(fd, "fileno"):
            fd = fd.fileno()
        return self._sync(fd, _REAL["fdatasync"])


def _fcntl_flags(fd: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _no_aio(self) -> str:
    return "crashsim: an AIO fdatasync would bypass the crash-simulating layer"


# ---- the harness -------------------------------------------------------------------------
def run_and_crash(workload: Callable[["CrashSim"], object], root: str, point: int | None = None,
                  *, seed: int = 0, block: int = 512, namespace: str = "prefix",
                  into: str | None = None, verify: bool = True) -> CrashImage:
    """Run `workload(sim)` under a CrashSim of `root`, then simulate a power loss after
    its `point`-th recorded call (counting the file calls listed in the module docstring;
    None: a point drawn from `seed`) and write the surviving files under `into`
    (default: `root` itself, emptied first), ready to be reopened by the project's own
    recovery. The workload must have stopped touching the files when it returns (close
    the group, stop its threads); everything it did after the crash point simply never
    happened, as far as the image goes.

    `sim.mark(label, value)` inside the workload records facts the check needs, e.g.
    `sim.mark("flushed", seq)` once a FLUSH completed; `image.last_mark("flushed")`
    then gives the last one acknowledged before the crash. The same recording can be
    cut at many points without running the workload again:
    `sim.recording.crashes(range(len(sim.recording) + 1), rng)`; this function is the
    one-crash shorthand. `verify` first checks that the layer saw every change under
    `root` (CrashSimError if a write went around it). Returns the CrashImage (its
    `point`, `files`, `marks`); raises CrashSimError for a point past the recording."""
    with CrashSim(root) as sim:
        workload(sim)
    rec = sim.recording
    if verify:
        rec.verify(root)
    rng = random.Random(seed)
    if point is None:
        point = rng.randint(0, len(rec))
    image = rec.crash(point, rng, block=block, namespace=namespace)
    image.materialize(into or root)
    return image
