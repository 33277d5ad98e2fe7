"""Processed records for one far target, on the node that ships to it: what the near
replica (or, in a cascade, this node's own receiver) made of them, kept until the far
target's stream takes them, and which path each record took.

The stream to the far target takes a run that begins exactly where it is
(`take(sent_seq + 1)`) and relays it verbatim; where none begins there it ships the
records as they are in the journal (*direct*), through the seq before the next run, so
the two kinds interleave in seq order and nothing waits for a near node that is away or
slow: it waits for a run at most `wait` seconds, and only while the near node is
processing (`processing`, set by the near node's stream from its OFFLOAD answer and its
session). A processed record is the same whichever node made it and whenever (its base
is the image before its seq), so runs from an earlier session of the near node stay
good; runs the far target is past are dropped, and at most `limit` bytes are kept.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from ..config import TargetConfig
from .codec import Op, ops_names, ops_of

RELAY_WAIT = 1.0  # seconds the far stream waits for a run the near node is processing
RELAY_LIMIT = 64 << 20  # bytes of processed runs kept for one far target


class Relay:
    def __init__(self, target: TargetConfig, *, via: str | None = None,
                 wait: float = RELAY_WAIT, limit: int = RELAY_LIMIT):
        self.cfg = target
        self.node = target.node  # the far target
        self.via = via  # the near node that processes (None: this node's own receiver)
        self.ops: Op = ops_of(target.process)
        self.wait, self.limit = wait, limit
        self._runs: OrderedDict[int, tuple[int, bytes]] = OrderedDict()  # first -> (last, payload)
        self._top = 0  # the highest seq of a run kept
        self.nbytes = 0
        self._processing = False  # the near node is processing for us, in a live session
        self.near = None  # its TargetLink while it does (whether it is in sync); None for
        # this node's own receiver (a cascade)
        self.refused = ""  # why the near node will not (its OFFLOAD answer), if it said so
        self.path = "direct"  # how the last records went: "via <node>" or "direct"
        self.records_processed = self.records_direct = 0
        self.bytes_processed = self.bytes_raw = 0  # relayed bytes, and those records' raw size
        self.dropped = 0  # runs not kept (over the limit)
        self.mismatches = 0  # processed writes the far target found on another base
        self.last_mismatch: dict | None = None
        self.path_changed = 0.0  # unix time of the last change of path
        self._gave_up = 0  # the seq whose run came too late: no more waiting until the
        # next run arrives (a slow near node must not slow the far link to its pace)
        self._arrived = asyncio.Event()

    @property
    def processing(self) -> bool:
        return self._processing

    @processing.setter
    def processing(self, value: bool) -> None:
        self._processing = value
        if not value:
            self._arrived.set()  # a far stream waiting for a run goes direct at once

    def add(self, first: int, last: int, payload: bytes) -> None:
        """A processed run of records first..last."""
        if first <= self._top:
            return  # resent after a reconnection: the run we hold is as good
        if self.nbytes + len(payload) > self.limit:
            self.dropped += 1
            return
        self._runs[first] = (last, payload)
        self._top = last
        self._gave_up = 0
        self.nbytes += len(payload)
        self._arrived.set()

    def last_of(self, seq: int) -> int:
        """The last seq of the run beginning at `seq` (which must be kept)."""
        return self._runs[seq][0]

    def take(self, seq: int, through: int, max_bytes: int) -> tuple[int, list]:
        """The runs from `seq` on, one after another, through `through` at most, at most
        `max_bytes` (the first whatever its size): (their last seq, their payloads). They
        leave the relay. The run at `seq` must be kept and end by `through`."""
        last, payloads, size = seq - 1, [], 0
        while True:
            run = self._runs.get(last + 1)
            if run is None or run[0] > through or payloads and size + len(run[1]) > max_bytes:
                return last, payloads
            del self._runs[last + 1]
            self.nbytes -= len(run[1])
            last, size = run[0], size + len(run[1])
            payloads.append(run[1])

    def next_start(self, after: int) -> int | None:
        """The first seq of the first run kept that begins after `after`."""
        for first in self._runs:
            if first > after:
                return first
        return None

    def drop_through(self, seq: int) -> None:
        """The far target holds every record through `seq`."""
        while self._runs:
            first, (last, payload) = next(iter(self._runs.items()))
            if first > seq:
                break
            del self._runs[first]
            self.nbytes -= len(payload)

    async def wait_for(self, seq: int) -> bool:
        """Wait (at most `wait` seconds) for a run beginning at `seq` while the near node
        is processing and in sync, unless a run past it came already (runs come in seq
        order: that one never will) or the last one came too late (until the next one
        comes). True if one is there."""
        if seq in self._runs:
            return True
        near = self.near
        if not self.processing or self._gave_up or self._top >= seq or \
                near is not None and not near.in_sync:
            return False
        self._arrived.clear()
        try:
            async with asyncio.timeout(self.wait):
                while seq not in self._runs and self._top < seq and self.processing:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            self._gave_up = seq
        return seq in self._runs

    def shipped(self, records: int, processed: bool, nbytes: int, raw: int) -> str | None:
        """`records` went to the far target, processed or direct; the new path when
        that changed it (for the log)."""
        path = f"via {self.via}" if processed and self.via else \
            "processed here" if processed else "direct"
        changed = path != self.path
        if changed:
            self.path, self.path_changed = path, time.time()
        if processed:
            self.records_processed += records
            self.bytes_processed += nbytes
            self.bytes_raw += raw
        else:
            self.records_direct += records
        return path if changed else None

    def why_direct(self) -> str:
        """Why records go direct now, in words."""
        if not self.processing:
            return (f"{self.via} refused: {self.refused}" if self.refused
                    else f"{self.via or 'this node'} is not processing (away, resyncing or "
                    "just connected)")
        if self.near is not None and not self.near.in_sync:
            return f"{self.via} is not in sync"
        if self.via is None:
            return "this node's receiver has not processed them (yet)"
        return f"{self.via}'s processed records came too late or not at all"

    def mismatched(self, seq: int, volume: str, offset: int, length: int) -> None:
        self.mismatches += 1
        self.last_mismatch = {"seq": seq, "volume": volume, "offset": offset,
                              "length": length, "time": round(time.time(), 3)}

    def status(self) -> dict:
        return {"via": self.via, "process": ops_names(self.ops),
                "path": self.path, "processing": self.processing,
                "refused": self.refused or None,
                "records_processed": self.records_processed,
                "records_direct": self.records_direct,
                "bytes_processed": self.bytes_processed, "bytes_raw": self.bytes_raw,
                "held_bytes": self.nbytes, "dropped_runs": self.dropped,
                "base_mismatches": self.mismatches, "last_mismatch": self.last_mismatch}
