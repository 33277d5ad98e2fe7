"""A snapshot: a consistent, writable copy of a replica's volumes in a directory of its
own, taken while replication runs on (the non-destructive DR drill promotes one of
these instead of the replica).

The copy is fuzzy, then made exact from the journal, as a database's online backup is:
the volumes are copied while records keep being applied (reflinked when the file
system can, else only their data extents), and every record applied between the
copy's start (seq s0) and its end (seq s1) is applied to the copy again, in order. A
region no record touched in (s0, s1] never changed; a region one did ends as its last
write there left it. The copy is then the image after s1, a prefix of the group's
history like the replica itself. A bunker replay can add the records after s1
(`apply`), exactly as a takeover adds them to the replica.

A rewind copy (`replicator rewind`) is a snapshot taken to a point of a secondary's
window (group/window.py): from the image after s1, the journal's records through the
point are applied to the copy (a point after s1: the replica applies late), or the
history's before-images of the records after it are written back onto the copy,
newest first (a point before s1).

The directory holds one image per volume and snapshot.json (group, seq, history, the
images; a rewind's point: time, marker), written last.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os

from . import statefile
from .generations import Generation, to_json
from .group import Group, GroupError, apply_to_volumes, received_records, volume_of
from .group.history import HistoryError
from .journal.record import FLAG_OPEN
from .journal.segments import Position
from .volume import Volume

_FICLONE = 0x40049409


class Snapshot:
    def __init__(self, group: Group, directory: str, position: Position,
                 history: list[Generation], volumes: dict[str, Volume]):
        self.group = group.name
        self.directory = directory
        self.position = position
        self.history = history
        self.volumes = volumes
        self._open: list = []  # applies of an epoch that does not close yet
        self._received = position.seq

    def apply(self, first_seq: int, last_seq: int, payload: bytes) -> None:
        """Apply records that follow the copy's position (a bunker replay) through the
        last one that closes an epoch (the rest wait for theirs, or are never applied);
        records it already holds are skipped, a gap or a stray record raises GroupError."""
        where = f"the copy of group {self.group}"
        for rec in received_records(payload, first_seq, last_seq, self._received, where):
            self._open.append((volume_of(self.volumes, rec, where), rec.kind, rec.offset,
                               rec.length, bytes(rec.payload)))
            self._received = rec.seq
            if not rec.flags & FLAG_OPEN:
                apply_to_volumes(self._open)
                self._open = []
                self.position = Position(rec.seq, rec.hcrc)

    def seal(self, point: dict | None = None) -> dict:
        """Make the images durable, write snapshot.json, close; returns the manifest."""
        for vol in self.volumes.values():
            vol.sync()
            vol.close()
        manifest = {"group": self.group, "seq": self.position.seq, "crc": self.position.hcrc,
                    **(point or {}), "history": to_json(self.history),
                    "volumes": {n: {"path": v.path, "size": v.size}
                                for n, v in self.volumes.items()}}
        statefile.write_new(os.path.join(self.directory, "snapshot.json"),
                            json.dumps(manifest, indent=1).encode())
        return manifest

    def discard(self) -> None:
        for vol in self.volumes.values():
            vol.close()


async def take(group: Group, directory: str) -> Snapshot:
    """Copy `group`'s volumes into `directory` (which must not exist or be empty) as the
    image after one seq, without pausing replication."""
    if not group.volumes:
        raise GroupError(f"group {group.name} has no volumes here (a bunker): nothing to copy")
    if os.path.isdir(directory) and os.listdir(directory):
        raise GroupError(f"{directory} is not empty: a snapshot needs a directory of its own")
    if group.inconsistent:
        raise GroupError(f"group {group.name} is being resynced here: no consistent image "
                         "to copy")
    if group.window.rewinding:
        raise GroupError(f"group {group.name}: a promote --at is taking the volumes to another "
                         "point right now: no consistent image to copy")
    os.makedirs(directory, exist_ok=True)
    loop = asyncio.get_running_loop()
    copies = {n: Volume(n, os.path.join(directory, f"{n}.img"), v.size)
              for n, v in group.volumes.items()}
    try:
        start = group.commit.applied_seq  # applies run on this loop: the image is after it
        for name, vol in group.volumes.items():
            copies[name].open()
            await loop.run_in_executor(None, _copy, vol.fd, copies[name].fd, vol.size)
        end = group.commit.applied_seq
        if group.inconsistent:
            raise GroupError(f"group {group.name}: a resync started during the copy")
        pos = group.journal.position(end)
        if pos is None or (end > start and group.journal.first_seq > start + 1):
            raise GroupError(f"group {group.name}: the journal no longer holds records "
                             f"{start + 1}..{end} applied during the copy; try again")
        snap = Snapshot(group, directory, group.journal.position(start) or pos,
                        list(group.lineage.history), copies)
        for first, last, data in group.journal.chunks(start, end):  # applied during the copy
            snap.apply(first, last, data)
        return snap
    except BaseException:
        for vol in copies.values():
            vol.close()
        raise


async def rewind(group: Group, directory: str, to: str) -> dict:
    """A copy of `group`'s volumes in `directory` at the point `to` names (a seq, time or
    marker of its window); returns the manifest."""
    window = group.window
    loop = asyncio.get_running_loop()
    window.history.pin()  # from the point's resolution to the undo: nothing dropped between
    try:
        point = window.resolve(to)
        snap = await take(group, directory)
        try:
            start = snap.position.seq
            if point.seq > start:
                for first, last, data in group.journal.chunks(start, point.seq):
                    snap.apply(first, last, data)
            elif point.seq < start:
                try:
                    await loop.run_in_executor(None, window.undo_onto, snap.volumes,
                                               point.seq, start)
                except HistoryError as exc:
                    raise GroupError(f"the history cannot take the copy to seq "
                                     f"{point.seq}: {exc}") from None
                snap.position = group.journal.position(point.seq) or group.journal.base
            if snap.position.seq != point.seq:
                raise GroupError(f"the copy reached seq {snap.position.seq}, not {point.seq}")
            return await loop.run_in_executor(None, snap.seal,
                                              {**point.as_dict(), "rewound_from": start})
        except BaseException:
            snap.discard()
            remove(directory)
            raise
    finally:
        window.history.unpin()


def remove(directory: str) -> None:
    """Delete a snapshot (its images, its manifest, then the directory if empty)."""
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if name.endswith((".img", ".json", ".tmp")):
            os.unlink(os.path.join(directory, name))
    try:
        os.rmdir(directory)
    except OSError:
        pass


def _copy(src: int, dst: int, size: int) -> None:
    """Copy a volume into an image file: a reflink when the file system shares extents,
    else its data extents only (holes stay holes)."""
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        return
    except OSError:
        pass
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole is left
            data = pos  # no SEEK_DATA (a block device): copy everything
        try:
            hole = min(size, os.lseek(src, data, os.SEEK_HOLE))
        except OSError:
            hole = size
        while data < hole:
            try:
                n = os.copy_file_range(src, dst, hole - data, data, data)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = os.pwrite(dst, os.pread(src, min(hole - data, 1 << 20), data), data)
            if n == 0:
                raise OSError(errno.EIO, f"short copy at offset {data}")
            data += n
        pos = hole
