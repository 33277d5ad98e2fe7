"""Watch capture: a volume that programs write directly (a VM's raw image, a database
file) instead of through NBD. On the group's primary the agent never writes such a
file; a Watcher (one per group, all its volumes) watches it and, at each consistent
point, journals the blocks that changed as one epoch of the group
(Commit.submit_epoch), which every replica applies all or nothing.

Trigger. A watchdog (inotify) observer on each file's directory: a write, create,
delete, move or close-after-write of the file, or of a sibling whose name starts with
"<file name>-" (a database's -wal or -journal), marks the group changed. Nothing polls
the files: an idle file costs nothing. An epoch is taken at min(first change not yet
captured + `interval`, last change + `quiet`). The first event disarms the observer (a
busy writer makes thousands of events a second, each one Python work in two threads:
41% of a core under a sqlite writer here, against its 2 cores); until the epoch, the
files' sizes and times are looked at instead (the last modification time says when
writes stopped: an epoch `quiet` after it), and the observer is armed again before the capture begins, so a write after
the capture's image raises an event. Writes through a shared mmap of the
file make no inotify events: such a writer is captured only when something else
triggers an epoch (or the agent restarts). With a freeze hook, an event whose file and
siblings still have the size and times they had right after the hook ran (its own
writes, a checkpoint, reported late) triggers nothing; without hooks nothing the
agent does makes an event.

Consistent point, group key `consistency`:
  reflink  each file is cloned (FICLONE) into `.<name>.replicator-epoch.new` beside it
           (a clone must be on the same file system), a frozen point-in-time image;
           the blocks that changed since the last epoch's clone
           (`.<name>.replicator-epoch`, kept until the next one is taken: that is
           what keeps their extents comparable) are those whose physical address (or
           presence) differs between the two clones' extent maps (FS_IOC_FIEMAP), so
           unchanged blocks are never read. XFS (reflink=1) and btrfs (compressed
           extents' addresses identify no blocks: they are sent again). A file system
           without FICLONE is an error in status and the log, never a silent fallback:
           use consistency hooks or none there. Freeze/thaw hooks, when set, run
           around the clone (sqlite: a `PRAGMA wal_checkpoint(TRUNCATE)` freeze hook,
           the writer with wal_autocheckpoint=0, makes the db file whole when cloned).
  hooks    the `freeze` command (e.g. `fsfreeze -f /mnt`) runs, the files are hashed
           in 64 KiB blocks (xxh3-128; one table of 16 B a block per volume, in
           memory) and the changed blocks read and journaled, then `thaw` runs: in a
           finally, also when freeze failed or timed out (`hook_timeout`). A failed
           hook means no epoch (error in status and the log), retried at the next
           trigger. The journal and the group's state must not be on the file system
           a freeze hook freezes: a watched file on the state directory's device is
           refused at start. A kill -9 between freeze and thaw leaves the file system
           frozen: thaw it by hand (`fsfreeze -u`).
  none     the live files are hashed and read, no freeze: crash-inconsistent (a
           replica holds an image no crash of the primary would have left), said as
           such in status.

An epoch's changed ranges are merged, split into records of at most 1 MiB and
journaled in parts of at most 64 MiB (all but the last part leave the epoch open), read
from the new clone (reflink) or the frozen file (hooks). The volume's reads (resync,
verify, NBD) switch to the new clone in the same loop turn as the epoch's last part is
submitted, so they see the image after the journal's last seq; once that part is
durable the new clone is renamed over the previous one. A crash anywhere leaves the
previous clone (the next epoch sends some blocks again: harmless) or the new one,
renamed after its epoch was durable. With no previous clone (first start, or lost;
always for hooks and none, whose tables are in memory) a baseline is taken and every
target gets a checksum resync: the file may have changed while nobody watched. An
epoch left open in the journal by a crash is closed by the next one (at once at start).

A file larger than its volume is an error (no epoch, nothing lost: retried when it
fits); a shorter or missing file reads as zeroes past its end. An epoch's records stay
in every journal until it closes (a replica acks only through a closed epoch), so an epoch
may take at most half the group's journal_size (a larger one is refused, loudly).
With hooks and none the volumes read the live files (there is no image of the last
epoch to read), so a resync or verify meanwhile sees blocks the next epoch sends.
A switchover or failback holds the watcher (hold/release): one last epoch, then none
until the handover is over; demoted, the volumes are a replica's (Volume.ensure_open).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from watchdog.events import (FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEventHandler)
from watchdog.observers import Observer

from .. import statefile
from ..group import GroupError
from ..hooks import HookError, run_hook
from ..journal.record import Kind
from ..verify import differing, region_hashes

FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1  # write dirty pages back first: no delayed allocations left
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800  # allocated, reads as zeroes
# unknown location, delayed allocation, encoded, not block aligned, inline, tail-packed:
# the physical address of such an extent identifies no blocks, so it counts as changed
FIEMAP_OPAQUE = 0x2 | 0x4 | 0x8 | 0x100 | 0x200 | 0x400
_FIEMAP = struct.Struct("=QQIIII")  # start, length, flags, mapped, extent count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, (reserved), flags
_EXTENTS_PER_CALL = 512

HASH_BLOCK = 64 << 10  # hooks / none: the unit hashed and sent
RECORD_BYTES = 1 << 20  # most payload of one journal record
ZERO_BYTES = 1 << 30  # most length of one ZERO record
PART_BYTES = 64 << 20  # most payload of one submit_epoch call (memory)
READ_BYTES = 4 << 20  # hashing reads
STAMP_TICK = 0.012  # s: more than one tick of the kernel's coarse clock (file times)
_NOT_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY)
_EVENTS = [FileModifiedEvent, FileCreatedEvent, FileDeletedEvent, FileMovedEvent,
           FileClosedEvent]


class WatchError(GroupError):
    """A watched group cannot capture (configuration, file system, hook, file size)."""


class Extent(NamedTuple):
    logical: int
    physical: int
    length: int
    flags: int


def fiemap(fd: int) -> list[Extent]:
    """The file's extents (FS_IOC_FIEMAP, after writing its dirty pages back)."""
    out: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP.size + _EXTENTS_PER_CALL * _EXTENT.size)
        _FIEMAP.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0,
                          _EXTENTS_PER_CALL, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP.unpack_from(buf)[3]
        out.extend(Extent(*_EXTENT.unpack_from(buf, _FIEMAP.size + i * _EXTENT.size))
                   for i in range(mapped))
        if not mapped or out[-1].flags & FIEMAP_EXTENT_LAST:
            return out
        start = out[-1].logical + out[-1].length


def _data_intervals(extents: list[Extent], size: int) -> list[tuple[int, int, int | None]]:
    """(start, end, ident) of the ranges below `size` that read data: the same ident
    over the same range means the same blocks (ident = physical - logical), None that
    the address identifies nothing. Unwritten extents read zeroes, like holes."""
    out = []
    for e in extents:
        end = min(e.logical + e.length, size)
        if e.logical < end and not e.flags & FIEMAP_EXTENT_UNWRITTEN:
            out.append((e.logical, end, None if e.flags & FIEMAP_OPAQUE
                        else e.physical - e.logical))
    return out


_HOLE = object()


def changed_extents(old: list[Extent], old_size: int, new: list[Extent],
                    new_size: int) -> list[tuple[int, int, bool]]:
    """Where the image of (new, new_size) may differ from that of (old, old_size), two
    clones of one file: merged (offset, length, data) ranges, data False where the new
    image reads zeroes (a hole, unwritten, past its end)."""
    a, b = _data_intervals(old, old_size), _data_intervals(new, new_size)
    points = sorted({p for s, e, _ in a + b for p in (s, e)})
    out: list[list] = []
    i = j = 0
    for p, q in zip(points, points[1:]):
        while i < len(a) and a[i][1] <= p:
            i += 1
        while j < len(b) and b[j][1] <= p:
            j += 1
        x = a[i][2] if i < len(a) and a[i][0] <= p else _HOLE
        y = b[j][2] if j < len(b) and b[j][0] <= p else _HOLE
        if x is _HOLE and y is _HOLE or x is not None and x == y:
            continue
        data = y is not _HOLE
        if out and out[-1][0] + out[-1][1] == p and out[-1][2] == data:
            out[-1][1] += q - p
        else:
            out.append([p, q - p, data])
    return [tuple(r) for r in out]


def changed_blocks(old: bytes, new: bytes, block: int, size: int) -> list[tuple[int, int, bool]]:
    """Merged (offset, length, True) ranges of the blocks whose hashes differ between
    two tables of one volume of `size` bytes."""
    out: list[list] = []
    for i in differing(old, new):
        offset = i * block
        length = min(block, size - offset)
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1][1] += length
        else:
            out.append([offset, length, True])
    return [tuple(r) for r in out]


def pieces(ranges, most: int = RECORD_BYTES):
    """(offset, length, data) ranges cut into records: data at most `most` bytes each,
    zeroes at most ZERO_BYTES."""
    for offset, length, data in ranges:
        step = most if data else ZERO_BYTES
        for at in range(offset, offset + length, step):
            yield at, min(step, offset + length - at), data


def parts(records, most: int = PART_BYTES) -> list[list]:
    """Records grouped into parts of at most `most` payload bytes (one submit_epoch each)."""
    out: list[list] = [[]]
    size = 0
    for rec in records:
        n = rec[2] if rec[3] else 0
        if out[-1] and size + n > most:
            out.append([])
            size = 0
        out[-1].append(rec)
        size += n
    return out if out[-1] else []


def read_at(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, zeroes past the file's end (or with no file, fd -1)."""
    data = os.pread(fd, length, offset) if fd >= 0 else b""
    return data if len(data) == length else data + bytes(length - len(data))


def file_hashes(fd: int, size: int, block: int = HASH_BLOCK) -> bytearray:
    """The hash of every `block` of the first `size` bytes of a file (zeroes past its end)."""
    out = bytearray()
    for offset in range(0, size, READ_BYTES):
        out += region_hashes(read_at(fd, offset, min(READ_BYTES, size - offset)), block)
    return out


def fs_type(path: str) -> str:
    """The type of the file system holding `path` (/proc/self/mounts), for messages."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def _device(path: str) -> int:
    """st_dev of `path`, or of its nearest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.stat(path).st_dev


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _last_write(stamps: list) -> float:
    """The latest modification time (unix seconds) among the files' stamps (0: none)."""
    return max((st[2] / 1e9 for files in stamps for st in files.values() if st), default=0.0)


class _File:
    """One watched file, its volume and its images."""

    def __init__(self, volume):
        self.volume = volume
        self.path = os.path.abspath(volume.path)
        self.dir, self.name = os.path.split(self.path)
        self.prev = os.path.join(self.dir, f".{self.name}.replicator-epoch")
        self.new = self.prev + ".new"
        self.image = -1  # the descriptor the volume's reads come from
        self.new_fd = -1  # reflink: the clone being journaled
        self.retired = -1  # the image before: closed one epoch later (a read may hold it)
        self.hashes: bytearray | None = None  # hooks / none: the table of the last epoch

    def stamps(self) -> dict:
        """Size and times of the file and its siblings (name-...): what a write changes."""
        names = [n for n in os.listdir(self.dir) if n.startswith(self.name + "-")]
        return {n: _stamp(os.path.join(self.dir, n)) for n in [self.name, *names]}

    def show(self, fd: int) -> None:
        """Reads come from `fd` from now on; the image before is retired."""
        if self.retired >= 0:
            os.close(self.retired)
        self.retired, self.image = self.image, fd
        self.volume.view(fd)

    def close(self) -> None:
        self.volume.view(None)
        for fd in {self.image, self.new_fd, self.retired} - {-1}:
            os.close(fd)
        self.image = self.new_fd = self.retired = -1


class _Events(FileSystemEventHandler):
    """Observer thread: an event about one of `names` (or its siblings) calls `changed`."""

    def __init__(self, names: set[str], changed):
        self.names, self.changed = names, changed

    def on_any_event(self, event) -> None:
        for path in (event.src_path, getattr(event, "dest_path", "") or ""):
            base = os.path.basename(os.fsdecode(path))
            if base in self.names or any(base.startswith(n + "-") for n in self.names):
                self.changed()
                return


class Watcher:
    """The capture of one watched group while this node is its primary (start/stop)."""

    def __init__(self, group, log: logging.Logger | None = None):
        self.group, self.cfg = group, group.cfg
        self.log = log or group.log
        self.files = [_File(group.volumes[v.name]) for v in self.cfg.volumes]
        for f in self.files:  # before Group.open: the primary's volume opens no fd of its own
            f.volume.watched = lambda: group.watched
        self.running = False
        self.state = "idle"
        self.epochs = 0
        self.last_epoch: dict | None = None
        self.error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"watch-{group.name}")
        self._observer: Observer | None = None
        self._first: float | None = None  # the first change not captured yet
        self._last: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._pending = False  # an event is on its way to the loop
        self._held = False  # a handover runs: no epoch (hold)
        self._stamps: list | None = None  # the files after the last freeze hook
        self._armed = False  # the observer watches the directories (else: a change is pending)
        self._seen: list | None = None  # disarmed: the files' stamps at the last look

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """This node is the group's primary: watch, and capture at once (the files may
        have changed while nobody watched; an epoch may be open in the journal)."""
        if self.cfg.consistency == "hooks":
            for f in self.files:
                if _device(f.dir) == _device(self.group.dir):
                    raise WatchError(
                        f"group {self.group.name}: watched file {f.path} is on the file system "
                        f"of the group's state ({self.group.dir}): a freeze hook would freeze "
                        "the journal too; put the state directory elsewhere")
        self._loop = asyncio.get_running_loop()
        self.running = True
        try:
            await self._run(self._open_images)
        except OSError as exc:
            self._failed(f"cannot open the watched files' images: {exc}")
        self._observer = Observer()
        for d in sorted({f.dir for f in self.files}):
            os.makedirs(d, exist_ok=True)
        self._observer.start()
        await self._run(self._arm)
        self._armed = True
        self.log.info("group %s: watching %s (consistency %s)", self.group.name,
                      ", ".join(f.path for f in self.files), self._consistency())
        # The first capture (the baseline, or the changes made while nobody watched)
        # before this returns: shippers that start next read the volumes' images.
        self._first = self._last = self._loop.time()
        self._due()
        await asyncio.wait([self._task])

    async def stop(self) -> None:
        """No longer primary (or the agent stops): stop watching; the volumes read and
        write their own files again."""
        self.running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._observer is not None:
            self._observer.stop()
            await self._run(self._observer.join)
            self._observer, self._armed = None, False
        self._stamps = None  # the next start captures, whatever the files look like
        for f in self.files:
            f.close()
            f.hashes = None
            if not self.group.watched:  # demoted: a replica's volume, which records write
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f.prev)  # (no image of this node's epochs any more)
                f.volume.ensure_open()
        self.state = "idle"

    async def hold(self) -> None:
        """A switchover or failback: the files' last changes go as one more epoch now, and
        none follows until release() (nothing may be journaled after the seq a switchover
        drains to); the volumes go on showing that last image."""
        self._held = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.wait([self._task])
        if self.running:
            self._first = self._last = self._loop.time()
            self._task = self._loop.create_task(self._capture(),
                                                name=f"watch-{self.group.name}")
            await asyncio.wait([self._task])
            if self.error is not None:
                raise WatchError(f"the last epoch before the handover failed: {self.error}")

    def release(self) -> None:
        """Epochs again (the node is still the primary: the handover failed)."""
        self._held = False
        if self.running and self._first is not None:
            self._schedule()

    def status(self) -> dict:
        """watching (this node is the primary), consistency ("none (crash-inconsistent)"
        says what none promises), state (idle, changed, capturing, error), epochs taken
        since start, the last one (its last seq, wall time, volumes changed, 4 KiB blocks
        and bytes, ms to find the changed blocks and for the whole capture), and the last
        capture's error (None once one works)."""
        return {"watching": self.running, "consistency": self._consistency(),
                "state": self.state, "epochs": self.epochs, "last_epoch": self.last_epoch,
                "error": self.error, "files": [f.path for f in self.files]}

    def _consistency(self) -> str:
        c = self.cfg.consistency
        return "none (crash-inconsistent)" if c == "none" else c

    def _run(self, func, *args):
        return self._loop.run_in_executor(self._io, func, *args)

    def _failed(self, why: str) -> None:
        self.error, self.state = why, "error"
        self._stamps = None  # what changed before is not captured: any event retries
        self.log.error("group %s: watch capture: %s", self.group.name, why)

    # ---- trigger -----------------------------------------------------------------------
    def _event(self) -> None:
        """Observer thread: one call into the loop for however many events."""
        if not self._pending:
            self._pending = True
            self._loop.call_soon_threadsafe(self._changed)

    def _arm(self) -> None:
        """io thread: events from the files' directories again."""
        for d in sorted({f.dir for f in self.files}):
            self._observer.schedule(_Events({f.name for f in self.files if f.dir == d},
                                            self._event), d, event_filter=_EVENTS)

    def _disarm(self) -> list:
        """io thread: no more events until _arm; the files' stamps now."""
        self._observer.unschedule_all()
        return self._all_stamps()

    def _all_stamps(self) -> list:
        return [f.stamps() for f in self.files]

    def _changed(self) -> None:
        self._pending = False
        if not self.running:
            return
        now = self._loop.time()
        if self._first is None:
            self._first = now
        self._last = now
        if self._armed and self._task is None:
            # A change is pending: sizes and times tell the rest (_trigger). Not while a
            # capture runs: a write after its image must still raise the next event.
            self._armed, self._seen = False, None
            self._run(self._disarm).add_done_callback(self._disarmed)
        if self._task is None and not self._held:
            if self.state != "error":
                self.state = "changed"
            self._schedule()

    def _schedule(self) -> None:
        due = min(self._first + self.cfg.epoch_interval, self._last + self.cfg.quiet)
        if self._timer is not None:
            if self._timer.when() == due:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._due)

    def _disarmed(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._seen = fut.result()

    def _due(self) -> None:
        self._timer = None
        if self.running and self._task is None and not self._held:
            self._task = self._loop.create_task(self._trigger(),
                                                name=f"watch-{self.group.name}")

    async def _trigger(self) -> None:
        """The epoch is due: unless the files still change (their stamps moved since the
        last look, with no event to say so while disarmed) and `interval` has not passed
        yet since the first change: then one `quiet` more."""
        if not self._armed:
            stamps = await self._run(self._all_stamps)
            now = self._loop.time()
            # the files' last write, on the loop's clock (mtime: a coarse clock's tick)
            written = now - max(0.0, time.time() - _last_write(stamps))
            if stamps != self._seen and written + self.cfg.quiet > now and \
                    now < self._first + self.cfg.epoch_interval:
                self._seen, self._last, self._task = stamps, written, None
                if self.running and not self._held:
                    self._schedule()
                return
        await self._capture()

    async def _capture(self) -> None:
        first = self._first
        if not self._armed and self.running:  # before the image: later writes raise events
            await self._run(self._arm)
            self._armed = True
        try:
            c = self.group.commit
            unchanged = self._stamps is not None and \
                await self._run(self._all_stamps) == self._stamps
            if unchanged and c.consistent_seq == c.durable_seq:
                self._first = self._last = None  # our own hook's writes, reported late
            else:
                self.state = "capturing"
                await self._take()
            self.error = None
        except (OSError, WatchError) as exc:
            self._failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: loudly; the next trigger retries
            self.log.exception("group %s: watch capture failed", self.group.name)
            self._failed(f"{type(exc).__name__}: {exc}")
        finally:
            self._task = None
        if not self.running:
            return
        if self._first is not None and self._first != first:
            self.state = "changed" if self.error is None else "error"
            if not self._held:
                self._schedule()  # changed again while capturing
        else:
            self._first = self._last = None
            self.state = "idle" if self.error is None else "error"

    # ---- images ------------------------------------------------------------------------
    def _open_images(self) -> None:
        """io thread, at start: the last epoch's clones (reflink) or the live files."""
        for f in self.files:
            if self.cfg.consistency == "reflink":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f.new)  # an epoch not known durable: the next one resends
                with contextlib.suppress(FileNotFoundError):
                    f.show(os.open(f.prev, os.O_RDONLY))
            else:
                f.show(_open_live(f.path))

    def _clone(self, f: _File) -> None:
        """io thread: the file (or an empty file, while it does not exist) cloned into
        f.new and made durable (the clone shares the file's blocks: cheap)."""
        fd = os.open(f.new, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            src = _open_live(f.path)
            if src >= 0:
                try:
                    fcntl.ioctl(fd, FICLONE, src)
                except OSError as exc:
                    if exc.errno in _NOT_REFLINK:
                        raise WatchError(
                            f"cannot clone {f.path} (FICLONE: {exc.strerror}): its file "
                            f"system ({fs_type(f.dir)}) has no reflinks; consistency reflink "
                            "needs XFS with reflink=1 or btrfs: use consistency hooks or "
                            "none for this group") from None
                    raise
                finally:
                    os.close(src)
            size = os.fstat(fd).st_size
            if size > f.volume.size:
                raise WatchError(f"{f.path} has {size} bytes, more than its volume's "
                                 f"{f.volume.size}: no epoch until it fits (nothing is lost)")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(f.new)
            raise
        f.new_fd = fd

    def _discard_new(self) -> None:
        """io thread: new clones whose epoch is not known durable go; a volume that shows
        one already (its epoch failed, or the capture was cancelled) shows the last again."""
        for f in self.files:
            if f.new_fd >= 0:
                if f.image == f.new_fd:
                    f.image, f.retired = f.retired, -1
                    f.volume.view(f.image)
                os.close(f.new_fd)
                f.new_fd = -1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f.new)

    def _keep_new(self) -> None:
        """io thread: the epoch of the new clones is durable: they are the last epoch's."""
        for f in self.files:
            if f.new_fd >= 0:
                os.rename(f.new, f.prev)
                f.new_fd = -1
        for d in {f.dir for f in self.files}:
            statefile.fsync_dir(d)

    @contextlib.asynccontextmanager
    async def _consistent_point(self):
        """Freeze hook, the body, thaw hook: the thaw runs whatever happened, also after a
        freeze that failed or timed out."""
        try:
            if self.cfg.freeze:
                await self._hook("freeze", self.cfg.freeze)
                # What the hook wrote itself (a checkpoint) is in this capture: its events,
                # when they come, find these stamps unchanged. A write from now on changes
                # them once the file system's clock (coarse: a tick, <= 10 ms) has moved on.
                self._stamps = await self._run(self._all_stamps)
                await asyncio.sleep(STAMP_TICK)
            yield
        finally:
            if self.cfg.thaw:
                await self._hook("thaw", self.cfg.thaw)

    async def _hook(self, what: str, command: str) -> None:
        try:
            await run_hook(what, command, self.cfg.hook_timeout)
        except HookError as exc:
            raise WatchError(f"{exc}: no epoch") from None

    # ---- epochs ------------------------------------------------------------------------
    async def _take(self) -> None:
        """One capture: an epoch, or the baseline when there is no last image to compare."""
        started = time.monotonic()
        self._first = self._last = None  # what changes from now on is the next epoch's
        if self.cfg.consistency == "reflink":
            baseline = any(f.image < 0 for f in self.files)
            try:
                async with self._consistent_point():
                    for f in self.files:
                        await self._run(self._clone, f)
                found = time.monotonic()
                plan = [] if baseline else await self._run(self._find_reflink)
                await self._journal(plan, started, time.monotonic() - found, baseline)
            finally:
                await self._run(self._discard_new)
            return
        async with self._consistent_point():  # hooks / none: all of it while frozen
            baseline = any(f.hashes is None for f in self.files)
            found = time.monotonic()
            plan = await self._run(self._find_hashed)
            await self._journal(plan, started, time.monotonic() - found, baseline)

    def _find_reflink(self) -> list:
        """io thread: (file, offset, length, data) of every range that changed between
        each file's last and new clone."""
        plan = []
        for f in self.files:
            old = (fiemap(f.image), os.fstat(f.image).st_size)
            new = (fiemap(f.new_fd), os.fstat(f.new_fd).st_size)
            plan += [(f, *r) for r in pieces(changed_extents(*old, *new))]
        return plan

    def _find_hashed(self) -> list:
        """io thread: the live files' blocks whose hashes changed; a file (re)opened so a
        replaced one is seen (the last table says what the replica holds)."""
        plan = []
        for f in self.files:
            fd = _open_live(f.path)
            size = os.lseek(fd, 0, os.SEEK_END) if fd >= 0 else 0  # (a device too)
            if size > f.volume.size:
                if fd >= 0:
                    os.close(fd)
                raise WatchError(f"{f.path} has {size} bytes, more than its volume's "
                                 f"{f.volume.size}: no epoch until it fits (nothing is lost)")
            f.show(fd)
            table = file_hashes(fd, f.volume.size)
            if f.hashes is None:
                f.hashes = table  # the baseline
                continue
            plan += [(f, *r) for r in pieces(changed_blocks(f.hashes, table, HASH_BLOCK,
                                                            f.volume.size))]
        return plan

    def _read(self, part: list) -> tuple[list, list]:
        """io thread: the records of one part, and the hashes they give their blocks."""
        items, hashes = [], []
        for f, offset, length, data in part:
            if not data:
                items.append((f.volume, Kind.ZERO, offset, length, b""))
                continue
            payload = read_at(f.new_fd if f.new_fd >= 0 else f.image, offset, length)
            if f.hashes is not None:
                hashes.append((f, offset // HASH_BLOCK, region_hashes(payload, HASH_BLOCK)))
            if payload.count(0) == length:
                items.append((f.volume, Kind.ZERO, offset, length, b""))
            else:
                items.append((f.volume, Kind.WRITE, offset, length, payload))
        return items, hashes

    async def _journal(self, plan: list, started: float, find_s: float,
                       baseline: bool) -> None:
        """Journal `plan` as one epoch, part by part (each durable before the next is
        read); the volumes show the new images from the turn the last part goes in."""
        c = self.group.commit
        size = sum(n for _, _, n, data in plan if data)
        if size > self.group.journal.capacity // 2:
            raise WatchError(f"an epoch of {size} bytes does not fit the journal (it stays "
                             "there, and in every replica's, until it closes): make "
                             f"journal_size at least {2 * size} bytes; no epoch until then")
        todo = parts(plan)
        if todo or c.consistent_seq < c.durable_seq:  # changes, or an epoch left open
            for i, part in enumerate(todo or [[]]):
                items, hashes = await self._run(self._read, part)
                last = i == max(0, len(todo) - 1)
                done = self._loop.create_future()
                c.submit_epoch(items, lambda err, fut=done: fut.done() or fut.set_result(err),
                               last=last)
                if last:
                    self._show_new()
                err = await done
                if err:
                    raise WatchError(f"journaling an epoch failed: {os.strerror(err)}")
                for f, block, h in hashes:
                    f.hashes[block * 16:block * 16 + len(h)] = h
            self.epochs += 1
            self.last_epoch = {
                "seq": c.durable_seq, "time": time.time(),
                "volumes": sorted({f.volume.name for f, *_ in plan}),
                "blocks": sum(-(-n // 4096) for _, _, n, _ in plan),  # of 4 KiB
                "bytes": size,
                "find_ms": round(find_s * 1000, 1),
                "capture_ms": round((time.monotonic() - started) * 1000, 1)}
            self.log.debug("group %s: epoch through seq %d: %s", self.group.name,
                           c.durable_seq, self.last_epoch)
        elif baseline:
            self._show_new()
        else:
            return  # nothing changed: the last epoch's images stay
        await self._run(self._keep_new)
        if baseline:
            # No image to compare with: this one is the base, and every target is checked
            # by checksum against it (the files may have changed while nobody watched).
            for t in self.group.targets.values():
                self.group.request_resync(t, "checksum", "watch capture started without "
                                          "the last epoch's image")

    def _show_new(self) -> None:
        for f in self.files:
            if f.new_fd >= 0:
                f.show(f.new_fd)


def _open_live(path: str) -> int:
    """The watched file for reading, or -1 while it does not exist."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return -1
