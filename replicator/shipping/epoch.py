"""What a periodic link sends of one epoch: the records (a, k] of the journal, k a
consistent seq, with the overwrites inside the epoch coalesced (last write wins). Pure:
records in, the bytes to send out.

- A record every byte of which later records of the same epoch write again (same
  volume; a ZERO writes too) goes as a SKIP of itself: it keeps its seq, so the stream
  stays gap-free, and changes nothing. Walking the epoch backwards with the union of the
  extents written after each record, per volume, finds them.
- Every record but the last carries FLAG_OPEN: the image after it is not consistent, so
  the target holds the epoch and applies it all or nothing, at its last record.
- The last record (seq k) goes unchanged: k is a consistent seq here (its record has no
  FLAG_OPEN), and the target's record at k must be byte for byte ours, header checksum
  included, for the next session's resume check to hold.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from typing import Iterable, Iterator

from ..journal.record import CHANGING, FLAG_OPEN, Kind, Record, rewritten


class Extents:
    """A union of half-open byte ranges: sorted, disjoint, touching ones merged (so a
    range lies in the union exactly when it lies in one of its members)."""

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def covers(self, start: int, end: int) -> bool:
        if start >= end:
            return True  # writes nothing
        i = bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        lo = bisect_left(self.ends, start)  # the first member that ends at or after start
        hi = bisect_right(self.starts, end)  # past the last member that starts by end
        if lo < hi:
            start, end = min(start, self.starts[lo]), max(end, self.ends[hi - 1])
        self.starts[lo:hi] = [start]
        self.ends[lo:hi] = [end]


class _Part:
    """The extents of the records of one epoch, a few bytes per record held."""

    def __init__(self):
        self.volumes: dict[str, int] = {}
        self.vol, self.start, self.end = array("H"), array("Q"), array("Q")
        self.last_seq = 0

    def add(self, rec: Record) -> None:
        self.vol.append(self.volumes.setdefault(rec.volume, len(self.volumes)))
        self.start.append(rec.offset)
        self.end.append(rec.offset + (rec.length if rec.kind in CHANGING else 0))
        self.last_seq = rec.seq

    def skips(self) -> bytearray:
        """1 at index i when later records of the epoch write every byte that record i
        writes, else 0 (always 0 for the last)."""
        vol, start, end = self.vol, self.start, self.end
        written = [Extents() for _ in self.volumes]
        skip = bytearray(len(vol))
        for i in range(len(vol) - 2, -1, -1):
            written[vol[i + 1]].add(start[i + 1], end[i + 1])
            skip[i] = written[vol[i]].covers(start[i], end[i])
        return skip


def rewrites(records: Iterable[Record]) -> bytearray:
    """For the records of one epoch in seq order: 1 at index i when later records of the
    epoch write every byte that record i writes, else 0 (always 0 for the last)."""
    part = _Part()
    for rec in records:
        part.add(rec)
    return part.skips()


def epochs(records: Iterable[Record]) -> list[tuple[int, bytearray]]:
    """The records (a, k] as the epochs a periodic link sends them: one that ends at
    each MARKER record on the way (the target then holds the image at the marker, as
    the primary did: inside a coalesced epoch it would be no image at all), and the
    last at k; each as (its last seq, its rewrites())."""
    out, part = [], _Part()
    for rec in records:
        part.add(rec)
        if rec.kind is Kind.MARKER:
            out.append((rec.seq, part.skips()))
            part = _Part()
    if part.last_seq:
        out.append((part.last_seq, part.skips()))
    return out


def coalesced(records: Iterable[Record], skip: bytearray) -> Iterator[tuple[Record, list]]:
    """The records of the epoch again, in the same order, each with the buffers to send
    for it (`skip` from rewrites() of the same records)."""
    last = len(skip) - 1
    for i, rec in enumerate(records):
        if i == last:
            yield rec, rewritten(rec, rec.flags)  # as it is: the same bytes
        else:
            yield rec, rewritten(rec, rec.flags | FLAG_OPEN, skip=bool(skip[i]))
