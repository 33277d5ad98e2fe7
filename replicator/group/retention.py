"""What a group's journal must keep, and waiting for room in it.

The journal keeps every record a target still needs (not durable on it, unless it is
logging: then its bitmap records the change), every record after the volumes'
checkpoint, and on a bunker what the primary's far replicas lack (RETAIN), within
logging_high_water bytes. When what must be kept leaves no room for the next batch the
journal is full: writes wait (status says `full`) while the checkpointer checkpoints,
trims and switches targets to logging.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..config import GroupConfig
from ..journal.segments import Journal
from .links import Links


class Retention:
    def __init__(self, cfg: GroupConfig, journal: Journal, links: Links, log: logging.Logger,
                 *, role: Callable[[], str], checkpoint_seq: Callable[[], int],
                 applied_seq: Callable[[], int], ask_checkpoint: Callable[[], None],
                 keep_after: Callable[[], int]):
        self.cfg = cfg
        self.name = cfg.name
        self.journal = journal
        self.targets = links
        self.log = log
        self._role, self._checkpoint_seq = role, checkpoint_seq
        self._applied_seq, self._ask_checkpoint = applied_seq, ask_checkpoint
        self._keep_after = keep_after  # a secondary's point-in-time window (window.py)
        self.journal_full = False  # writes wait for the journal to be trimmed
        self.bunker_far_seq: int | None = None  # bunker: RETAIN from the primary
        self._space = asyncio.Event()

    async def trim(self) -> None:
        """Drop the records nobody needs any more (the checkpointer, after a checkpoint)."""
        low = self.needed_after()
        if low > self.journal.base.seq:
            gone = self.journal.trim_through(low)
            if gone:
                await asyncio.get_running_loop().run_in_executor(None, self.journal.delete, gone)

    def room_made(self) -> None:
        """The checkpointer looked: writes waiting for room check again."""
        self._space.set()

    def needed_after(self) -> int:
        """Records after this seq must stay in the journal: not yet in the volumes'
        checkpoint, not acked by a streaming target, not marked in a logging target's
        saved bitmap, not in a secondary's point-in-time window. A bunker keeps what the far replicas lack (a takeover replays it
        from there), within logging_high_water bytes."""
        if self._role() == "bunker":  # journal only; a restart still checks its checkpoint
            return min(self._bunker_needed_after(), self._checkpoint_seq())
        low = min(self._checkpoint_seq(), self._keep_after())
        for t in self.targets.values():
            low = min(low, t.bitmap.through if t.logging else t.acked_seq)
        return low

    def far_seq(self) -> int:
        """Primary: the records through this seq are on every target but the bunkers
        (what a bunker may drop; RETAIN tells it)."""
        return min((t.acked_seq for t in self.targets.values() if not t.bunker),
                   default=self.journal.last_seq)

    def retain(self, seq: int) -> None:
        """Bunker: the primary's far replicas hold every record through `seq`."""
        self.bunker_far_seq = seq

    def _bunker_needed_after(self) -> int:
        """Keep every record the far replicas lack (after RETAIN's seq; all of them before
        the first RETAIN), but at most logging_high_water bytes: the primary switches a
        far replica that lags more than that to logging, and no replay can help it then."""
        j = self.journal
        ring = self._bunker_keep(self.cfg.logging_high_water)
        far = self.bunker_far_seq
        if far is None:
            return ring
        if far >= j.base.seq and ring > far:  # about to drop what the far replicas lack
            self.log.warning("group %s: bunker journal overrun: the far replicas lack records "
                             "from seq %d, but it holds at most %d bytes (logging_high_water); "
                             "a takeover can no longer replay records %d..%d", self.name,
                             far + 1, self.cfg.logging_high_water, far + 1, ring)
        return max(ring, min(far, j.last_seq))

    def bunker_status(self) -> dict | None:
        """Bunker: how far the far replicas lag, and whether a takeover replay still has
        every record they lack."""
        if self._role() != "bunker":
            return None
        j, far = self.journal, self.bunker_far_seq
        return {"far_seq": far, "far_lag_records": None if far is None else max(0, j.last_seq - far),
                "covers_far_replicas": None if far is None else far >= j.base.seq}

    def _bunker_keep(self, budget: int) -> int:
        """The lowest seq s such that the records after s fit in `budget` bytes."""
        j = self.journal
        lo, hi = j.base.seq, j.last_seq
        while lo < hi:
            mid = (lo + hi) // 2
            if j.bytes_between(mid, j.last_seq) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def could_free(self) -> bool:
        """A checkpoint, a trim or switching targets to logging (what the checkpointer
        does while the journal is full) would free the journal's oldest segment; an
        on_disconnect: block target is never switched: writes wait for it."""
        oldest = self.journal.oldest_segment_last_seq()
        if oldest is None:
            return False
        if self._role() == "bunker":
            return self.needed_after() >= oldest
        low = self._applied_seq()
        for t in self.targets.values():
            if t.logging:  # its bitmap is marked through the end, unless a resync finishes
                low = min(low, t.bitmap.through if t.finishing else self.journal.last_seq)
            elif t.block:
                low = min(low, t.acked_seq)
        return low >= oldest

    async def wait_for_space(self, nbytes: int) -> None:
        """The journal is full (writes wait, status says `full`) while the records its
        targets and the checkpoint need do not leave room for `nbytes`, or its reserved
        segments are used up (records rarely fill a segment to the byte) and trimming
        can free one. Meanwhile the checkpointer switches the targets that hold it to
        logging (Group._update_logging)."""
        j = self.journal
        while True:
            needed = j.bytes_between(self.needed_after(), j.last_seq)
            if (needed == 0 or needed + nbytes <= j.capacity) and (
                    j.has_room(nbytes) or not self.could_free()):
                if self.journal_full:
                    self.log.info("group %s: journal has room again", self.name)
                self.journal_full = False
                return
            if not self.journal_full:
                self.log.warning("group %s: journal full (%d of %d bytes still needed by "
                                 "targets); writes wait", self.name, needed, j.capacity)
            self.journal_full = True
            self._space.clear()
            self._ask_checkpoint()
            await self._space.wait()
