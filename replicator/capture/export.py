"""An NBD export of one volume of a group: reads go straight to the volume, writes
and zeroes into the group's write path. Writable only where the group is primary."""

from __future__ import annotations

from ..group import Group
from ..volume import Volume


class VolumeExport:
    def __init__(self, group: Group, volume: Volume):
        self.group = group
        self.volume = volume
        self.name = volume.name
        self.size = volume.size

    @property
    def read_only(self) -> bool:
        return self.group.role != "primary"

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool, done) -> None:
        # Every write completes durable (journal fdatasync), so FUA needs nothing more.
        self.group.submit_write(self.volume, offset, data, done)

    def zero(self, offset: int, length: int, fua: bool, done) -> None:
        self.group.submit_zero(self.volume, offset, length, done)

    def flush(self, done) -> None:
        # Writes complete only once durable in the journal: nothing is left to flush.
        done(0)
