"""Writes that completed but are not durable yet, served to reads from memory.

The durability contract lets a write complete once its record is in the journal's page
cache; the journal's fdatasync comes later (a FLUSH, a FUA write, `commit_interval`, a
shipper waiting for records). Until then the record is not written to its volume, so a
power loss can never leave a volume holding a write that its journal lost: after any
crash the volumes hold the image after the checkpoint's seq, and replaying the journal's
durable records makes it the image after some seq k that is at least every flush point
acknowledged (DESIGN.md invariant 1). Reads must still see completed writes, so each
one also goes into this table until its batch is durable and applied; a read takes the
volume's bytes and lays over them, in seq order, the table's writes it overlaps (an
LSM-style memtable in front of the volume).

Each entry is indexed under every GRAIN-sized block of its volume it touches, so a read
looks only at the few blocks it covers. Entries leave in seq order, whole batches at a
time, when the batch is applied to the volume (drop_through).
"""

from __future__ import annotations

from collections import deque

GRAIN = 64 << 10  # bytes of a volume per index block


class _Entry:
    __slots__ = ("seq", "offset", "end", "payload")

    def __init__(self, seq: int, offset: int, length: int, payload):
        self.seq = seq
        self.offset = offset
        self.end = offset + length
        self.payload = payload  # None: zeroes (TRIM, WRITE_ZEROES)


class Memtable:
    def __init__(self):
        self._blocks: dict[tuple[str, int], list[_Entry]] = {}  # (volume, block) -> entries
        self._batches: deque = deque()  # (last_seq, [(key, entry)]) in seq order
        self.nbytes = 0  # payload bytes held

    def __bool__(self) -> bool:
        return bool(self._batches)

    def add(self, last_seq: int, records) -> None:
        """A written batch: records are (seq, volume name, offset, length, payload)."""
        keys = []
        blocks = self._blocks
        for seq, volume, offset, length, payload in records:
            entry = _Entry(seq, offset, length, payload)
            for block in range(offset // GRAIN, (offset + max(length, 1) - 1) // GRAIN + 1):
                key = (volume, block)
                entries = blocks.get(key)
                if entries is None:
                    blocks[key] = [entry]
                else:
                    entries.append(entry)
                keys.append((key, entry))
            self.nbytes += len(payload) if payload is not None else 0
        self._batches.append((last_seq, keys))

    def drop_through(self, seq: int) -> None:
        """The batches through `seq` are in the volumes now: forget them."""
        blocks = self._blocks
        while self._batches and self._batches[0][0] <= seq:
            _, keys = self._batches.popleft()
            for key, entry in keys:
                entries = blocks[key]
                entries.remove(entry)  # the oldest entries come first: found at once
                if not entries:
                    del blocks[key]
                if entry.payload is not None and entry.offset // GRAIN == key[1]:
                    self.nbytes -= len(entry.payload)

    def overlay(self, volume: str, offset: int, data: bytes) -> bytes:
        """`data` read from `volume` at `offset`, with the writes held here laid over it."""
        if not self._batches:
            return data
        end = offset + len(data)
        found: dict[int, _Entry] = {}
        for block in range(offset // GRAIN, (end - 1) // GRAIN + 1):
            for entry in self._blocks.get((volume, block), ()):
                if entry.offset < end and entry.end > offset:
                    found[id(entry)] = entry
        if not found:
            return data
        out = bytearray(data)
        for entry in sorted(found.values(), key=lambda e: e.seq):
            lo, hi = max(offset, entry.offset), min(end, entry.end)
            if entry.payload is None:
                out[lo - offset:hi - offset] = bytes(hi - lo)
            else:
                out[lo - offset:hi - offset] = entry.payload[lo - entry.offset:hi - entry.offset]
        return bytes(out)
