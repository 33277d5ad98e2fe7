"""An NBD export of one volume of a group: reads see the volume with the group's
completed writes, writes and zeroes go into the group's write path, FLUSH and FUA are
its durability points (group/commit.py). Writable only where the group is primary and
its volumes are not watched files (capture: watch: programs write those directly)."""

from __future__ import annotations

from ..group import Group
from ..metrics import IoStats
from ..volume import Volume


class VolumeExport:
    def __init__(self, group: Group, volume: Volume):
        self.group = group
        self.commit = group.commit
        self.volume = volume
        self.name = volume.name
        self.size = volume.size
        self.stats = IoStats()  # its NBD writes and flushes, for metrics.py

    @property
    def read_only(self) -> bool:
        return self.group.role != "primary" or self.group.watched

    def read(self, offset: int, length: int) -> bytes:
        return self.commit.read(self.volume, offset, length)

    def write(self, offset: int, data: bytes, fua: bool, done) -> None:
        done = self.stats.write(len(data), done)
        self.commit.submit_write(self.volume, offset, data, self._fua(done) if fua else done)

    def zero(self, offset: int, length: int, fua: bool, done) -> None:
        done = self.stats.write(length, done)
        self.commit.submit_zero(self.volume, offset, length, self._fua(done) if fua else done)

    def flush(self, done) -> None:
        self.commit.submit_flush(self.stats.flush(done))

    def _fua(self, done):
        """A FUA write completes as the write followed by a flush."""
        def written(err: int) -> None:
            if err:
                done(err)
            else:
                self.commit.submit_flush(done)
        return written
