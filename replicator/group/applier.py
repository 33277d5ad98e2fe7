"""The applier of a secondary that keeps a history (`retain`) or applies late
(`apply_delay`): the commit path only journals what it receives; this applies the
durable journal to the volumes in steps, in seq order, each step ending at an epoch's
end (a consistent point):

1. take the records after the volumes' seq whose primary time is `apply_delay` old
   (all of them without a delay), at most STEP_BYTES, back to the last that closes an
   epoch;
2. save their before-images and the step's end in the history, durably (a worker
   thread; group/history.py says why first);
3. write them to the volumes, on the loop (like the commit path: a snapshot's copy
   relies on applies happening only there), and move applied_seq on.

The records wait in the journal, which keeps everything after the volumes' checkpoint.
When the journal is half full of records the delay still holds back, the delay gives
way for the oldest of them, until a quarter of the journal waits (before the source's
logging_high_water, 3/4 of a journal of the same size, sends it to logging) (they are applied now, with a warning and an event) rather than stop
replication: what the volumes lag by is the operator's to size (journal_size).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..events import emit
from ..journal.segments import Journal
from ..volume import Volume
from .commit import Commit, GroupError, apply_to_volumes
from .history import History, HistoryError

STEP_BYTES = 8 << 20  # of record payload per step (a longer epoch is one step)
RETRY = 1.0  # seconds before a failed step is tried again
PRESSURE_CHECK = 1.0  # seconds between looks at the journal while the delay holds records


class Applier:
    def __init__(self, name: str, journal: Journal, volumes: dict[str, Volume], commit: Commit,
                 history: History, delay: float, log: logging.Logger, in_io,
                 step_bytes: int = STEP_BYTES):
        self.name = name
        self.journal = journal
        self.volumes = volumes
        self.commit = commit
        self.history = history
        self.delay_ns = int(delay * 1e9)
        self.step_bytes = step_bytes
        self.log = log
        self._in_io = in_io  # the group's io worker: history saves and clears in turn
        self.hurried = False  # the journal filled: applying before the delay is over
        self.held: str | None = None  # why nothing may be applied (window.py: rewind.json)
        self._wake = asyncio.Event()
        self._paused = 0
        self._stepping = asyncio.Lock()  # one step at a time (run, and catch_up)
        self._waiting_for_time = False  # the next record falls due later: a timer wakes us
        commit.applier_wake = self._woken

    async def run(self) -> None:
        while True:
            self._wake.clear()  # before the step: a wake during it makes another
            try:
                wait = await self.step(None) if not (self._paused or self.held) else None
            except HistoryError as exc:
                self.log.info("group %s: apply step dropped: %s", self.name, exc)
                wait = None
            except OSError as exc:
                msg = (f"applying the journal to the volumes failed after seq "
                       f"{self.commit.applied_seq} ({exc}); records stay journaled, retried "
                       f"every {RETRY:g}s")
                if self.commit.volume_error != msg:
                    self.log.error("group %s: %s", self.name, msg)
                self.commit.volume_error = msg
                wait = RETRY
            if wait == 0:
                continue
            self._waiting_for_time = wait is not None
            if wait is not None:
                wait = min(wait, PRESSURE_CHECK)
            try:  # (not wait_for: on 3.11 it loses a cancel that comes with the wake)
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _woken(self) -> None:
        """The commit path: records are durable. Not a reason to look while the next
        one is not due yet (a delayed secondary gets batches far more often than its
        records fall due)."""
        if not self._waiting_for_time or self._over_pressure():
            self._wake.set()

    async def step(self, through: int | None) -> float | None:
        """Apply one step (due records; every record through `through` if given, delay
        or not). Returns 0 if more is due now, the seconds until the next record falls
        due, or None when nothing waits. One step at a time: a second one would save
        before-images the first one is overwriting."""
        async with self._stepping:
            return await self._step(through)

    async def _step(self, through: int | None) -> float | None:
        c = self.commit
        target = c.consistent_seq if through is None else min(through, c.consistent_seq)
        if c.applied_seq >= target:
            return None
        cutoff = time.time_ns() - self.delay_ns
        if through is not None:
            cutoff = 1 << 63
        elif self._pressed():  # early, the oldest first, until a quarter of it waits
            cutoff, target = 1 << 63, self._early_through(target)
        first = self.journal.time_ns(c.applied_seq + 1)  # (one header read)
        if first > cutoff:
            return (first - cutoff) / 1e9
        records, nbytes, end, wait = [], 0, 0, None
        for rec in self.journal.records(c.applied_seq, target):
            if rec.time_ns > cutoff:
                wait = (rec.time_ns - cutoff) / 1e9
                break
            records.append(rec)
            nbytes += rec.length
            if not rec.flags:
                end = len(records)
                if nbytes >= self.step_bytes:
                    break
        if not end:
            return wait
        records = records[:end]
        last = records[-1]
        await self._in_io(self.history.save, last.seq, last.time_ns, records, self.volumes)
        apply_to_volumes([(self.volumes[r.volume], r.kind, r.offset, r.length, r.payload)
                          for r in records if r.volume in self.volumes])
        c.applied_through(last.seq)
        return 0 if last.seq < target else wait

    def _early_through(self, target: int) -> int:
        """The seq through which records go early for no more than a quarter of the
        journal to wait after it."""
        j, lo, hi = self.journal, self.commit.applied_seq, target
        while lo < hi:  # the smallest seq leaving at most capacity/4 after it
            mid = (lo + hi) // 2
            if j.bytes_between(mid, j.last_seq) <= j.capacity // 4:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _over_pressure(self) -> bool:
        j = self.journal
        return bool(self.delay_ns) and j.used_bytes > j.capacity // 2

    def _pressed(self) -> bool:
        """The journal is half full: the delay gives way (see the docstring)."""
        j = self.journal
        full = self._over_pressure()
        if full and not self.hurried:
            self.log.warning("group %s: the journal is half full of records waiting for "
                             "apply_delay: applying them now (the volumes lag by less than "
                             "the delay until it empties; a larger journal_size keeps it)",
                             self.name)
            emit("apply_delay_shortened", self.name, journal_bytes=j.used_bytes)
        self.hurried = bool(full)
        return self.hurried

    async def catch_up(self, through: int | None = None) -> None:
        """Apply every durable record (through `through`), the delay notwithstanding (a
        promote, a switchover, a rewind in place)."""
        c = self.commit
        if self.held:
            raise GroupError(self.held)
        target = c.consistent_seq if through is None else through
        self.pause()
        try:
            while c.applied_seq < target:
                before = c.applied_seq
                await self.step(target)
                if c.applied_seq == before:
                    break  # nothing closes an epoch before it
        finally:
            self.resume()

    def pause(self) -> None:
        self._paused += 1

    async def hold(self) -> None:
        """Pause, once the step running (if any) is over; resume() ends it."""
        self.pause()
        async with self._stepping:
            pass

    def resume_after_hold(self) -> None:
        """`held` was lifted: look again."""
        self._waiting_for_time = False
        self._wake.set()

    def resume(self) -> None:
        self._paused -= 1
        self._waiting_for_time = False
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Records durable here and not yet in the volumes."""
        return self.commit.consistent_seq - self.commit.applied_seq
