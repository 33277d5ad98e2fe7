"""A group's markers on this node: the named points of its journal (MARKER records,
journal/record.py), each with its seq, name, the time the primary took it and whether
it was taken between freeze and thaw hooks (application-consistent).

The primary takes one with `replicator mark`; every node that journals the record (a
replica, an intermediate of a cascade, a bunker) notes it here as it journals it, so
markers travel down every link with the records. The list is kept in group.json with
the checkpoint; records the journal no longer holds after a crash, a dropped open
epoch or a resync take their markers with them (`cut`). Names are unique in a group
(a rewind names its point by them). At most KEEP are kept, the oldest dropped first.
"""

from __future__ import annotations

import bisect
from typing import Callable, NamedTuple

from ..events import emit

KEEP = 10000


class Marker(NamedTuple):
    seq: int
    name: str
    time_ns: int
    consistent: bool  # taken between freeze and thaw hooks

    def as_dict(self) -> dict:
        return {"seq": self.seq, "name": self.name, "time_ns": self.time_ns,
                "consistent": self.consistent}


class Markers:
    def __init__(self, group: str, *, changed: Callable[[], None]):
        self.group = group
        self._changed = changed  # group.json must be saved again
        self._seqs: list[int] = []
        self._by_seq: dict[int, Marker] = {}
        # What state() gives: rebuilt on the loop at each change, never changed in place,
        # since the checkpoint reads it from its thread while the loop goes on.
        self._saved: list = []

    def load(self, state: dict) -> None:
        for seq, name, time_ns, consistent in state.get("markers", []):
            self._add(Marker(seq, name, time_ns, bool(consistent)))
        self._saved = self._snapshot()

    def state(self) -> dict:
        return {"markers": self._saved}

    def _snapshot(self) -> list:
        return [list(self._by_seq[s]) for s in self._seqs]

    def _save(self) -> None:
        self._saved = self._snapshot()
        self._changed()

    def took(self, seq: int, name: str, time_ns: int, consistent: bool, *,
             announce: bool = True) -> Marker:
        """The journal holds a MARKER record at `seq` (or will: a batch queued for it);
        `announce` emits its event now (else the caller does, once it is journaled)."""
        marker = Marker(seq, name, time_ns, consistent)
        if self._by_seq.get(seq) != marker:
            self._add(marker)
            self._save()
            if announce:
                self.announce(marker)
        return marker

    def announce(self, marker: Marker) -> None:
        emit("marker", self.group, name=marker.name, marker_seq=marker.seq,
             consistent=marker.consistent)

    def _add(self, marker: Marker) -> None:
        if marker.seq not in self._by_seq:
            bisect.insort(self._seqs, marker.seq)
        self._by_seq[marker.seq] = marker
        while len(self._seqs) > KEEP:
            del self._by_seq[self._seqs.pop(0)]

    def cut(self, seq: int) -> None:
        """The journal ends at `seq` now: forget the markers after it."""
        i = bisect.bisect_right(self._seqs, seq)
        if i < len(self._seqs):
            for s in self._seqs[i:]:
                del self._by_seq[s]
            del self._seqs[i:]
            self._save()

    def status(self) -> dict:
        """How many, and the last one (status)."""
        last = self._by_seq[self._seqs[-1]].as_dict() if self._seqs else None
        return {"count": len(self._seqs), "last": last}

    def named(self, name: str) -> Marker | None:
        return next((m for m in self._by_seq.values() if m.name == name), None)

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self):
        return (self._by_seq[s] for s in self._seqs)
