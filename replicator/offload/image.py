"""A replica's image as it is after the last record a session has seen: the content a
write overwrites (its *base*), which a near node processes against and a far node
checks and restores against (codec.py).

A record the session fed in may not be visible to the group's reads yet (queued, not
written; or inside an epoch that is still open), so the image lays what it was fed over
the group's reads (group/commit.py `read`: the volumes and the memtable) until the group
is consistent past it. Everything runs on the event loop, like the group's own reads and
applies, so a read never meets a half-applied batch.

A session that begins mid-stream does not know what the group has queued before it:
`valid_after` is the seq from which every earlier record is either fed here or part of
the group's consistent image, and bases are only read for records past it.
"""

from __future__ import annotations

from ..group import Group
from ..group.memtable import Memtable
from ..journal.record import CHANGING, Kind, Record
from .codec import ProcessedError


class Image:
    def __init__(self, group: Group, fed_through: int):
        self.group = group
        self._pending = Memtable()
        self.valid_after = fed_through  # records through this one were submitted before us

    @property
    def valid(self) -> bool:
        return self.group.commit.consistent_seq >= self.valid_after

    def base(self, rec: Record) -> bytes:
        """What `rec` overwrites: the image's content at its extent, before it."""
        vol = self.group.volumes.get(rec.volume)
        if vol is None or rec.offset + rec.length > vol.size:
            raise ProcessedError(f"seq {rec.seq} writes {rec.volume!r} [{rec.offset}, "
                                 f"+{rec.length}), which group {self.group.name} does not have")
        data = self.group.commit.read(vol, rec.offset, rec.length)
        return self._pending.overlay(rec.volume, rec.offset, data)

    def feed(self, rec: Record) -> None:
        """`rec` is the next record of the image (its payload restored)."""
        if rec.kind in CHANGING:
            payload = rec.payload if rec.kind is Kind.WRITE else None
            self._pending.add(rec.seq, ((rec.seq, rec.volume, rec.offset, rec.length,
                                         payload),))

    def settle(self) -> None:
        """Forget what the group's own reads show now (durable and consistent)."""
        self._pending.drop_through(self.group.commit.consistent_seq)
