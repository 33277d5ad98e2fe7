"""A secondary's point-in-time window (`retain`, `apply_delay`): the history and the
applier (history.py, applier.py) composed, the window's limits, and the points in it.

A point is a consistent seq inside the window: from the history's first step end
(or the journal's base, if later) to the last durable record that closes an epoch. It
is named by a seq, a time (the last consistent seq journaled at or before it, by the
primary's clock) or a marker. The window keeps the journal from its start too (the
records' times and flags, the markers, what a promote --at keeps aside), and is
dropped oldest file first when it outgrows `retain` (its time, or its bytes: history
plus journal) or half the journal (so that records keep coming in).

A rewind in place (promote --at) writes rewind.json first: a restart that finds it
takes the volumes back to that point again (history.py: an undo may be redone) and
holds them there, so that no record after the point is applied behind the operator's
back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from .. import statefile
from ..events import emit
from ..journal.record import FLAG_OPEN
from ..sizes import size_text
from .applier import STEP_BYTES, Applier
from .commit import GroupError
from .history import History, HistoryError

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Point(NamedTuple):
    seq: int
    time_ns: int  # when the primary journaled it (0: not known, the window's start)
    marker: str | None

    def as_dict(self) -> dict:
        return {"seq": self.seq, "time_ns": self.time_ns, "time": _iso(self.time_ns),
                "marker": self.marker}


class Window:
    def __init__(self, group):
        self.group = group
        cfg = group.cfg
        self.retain_seconds, self.retain_bytes = cfg.retain_seconds, cfg.retain_bytes
        self.delay = cfg.apply_delay
        self.configured = bool(self.retain_seconds or self.retain_bytes or self.delay)
        self.history = History(os.path.join(group.dir, "history"),
                               images=bool(self.retain_seconds or self.retain_bytes),
                               file_bytes=min(64 << 20, max(1 << 20, self.retain_bytes // 16))
                               if self.retain_bytes else 64 << 20,
                               file_seconds=self.retain_seconds / 16)
        self.applier: Applier | None = None
        self.held: str | None = None  # why nothing is applied (an interrupted promote --at)
        self.limited_by: str | None = None  # "journal_size" when the journal cut the window
        self._resyncing = False  # the applier is held until the resync ends
        self._task: asyncio.Task | None = None
        self.rewinding = False  # a rewind in place is writing the volumes (no snapshot now)
        self._rewind_path = os.path.join(group.dir, "rewind.json")

    @property
    def active(self) -> bool:
        return self.applier is not None

    def wanted(self) -> bool:
        return self.configured and self.group.role == "secondary"

    # ---- lifecycle ---------------------------------------------------------------------
    def open(self) -> tuple[int | None, dict | None]:
        """Recovery: (the seq the volumes were applied through, an interrupted rewind),
        or (None, None) when the journal is applied as it comes (no history kept, any
        left over removed)."""
        if not self.wanted():
            if os.path.isdir(self.history.directory):
                self.group.log.warning("group %s: not a secondary with retain/apply_delay "
                                       "any more: its point-in-time history is dropped",
                                       self.group.name)
                self.history.remove()
            return None, None
        return self.history.open(), self._rewind_state()

    def activate(self, applied_seq: int, fresh: bool) -> None:
        """Start applying through the applier (recovered, or a new history after
        `applied_seq`); held while a resync is unfinished or a rewind was interrupted."""
        g = self.group
        if fresh:
            self.history.start_at(applied_seq, g.journal.time_ns(applied_seq))
        self.applier = Applier(g.name, g.journal, g.volumes, g.commit, self.history,
                               self.delay, g.log, g.in_io,
                               step_bytes=min(STEP_BYTES, self.retain_bytes // 16 or STEP_BYTES))
        self.applier.held = self.held
        g.commit.deferred, g.commit.delayed = True, bool(self.delay)
        self._resyncing = g.inconsistent
        if self._resyncing:
            self.applier.pause()

    async def begin(self, applied_seq: int) -> None:
        """A primary that became a secondary (demote): a new window after `applied_seq`."""
        g = self.group
        await g.in_io(self.history.start_at, applied_seq, g.journal.time_ns(applied_seq))
        self.activate(applied_seq, fresh=False)

    async def resync_started(self) -> None:
        """A resync overwrites the volumes out of order: nothing is applied meanwhile, and
        the window is void (its before-images do not cover what the resync writes)."""
        if self.active and not self._resyncing:
            self._resyncing = True
            await self.applier.hold()
            await self.group.in_io(self.history.clear)

    async def resynced(self, seq: int) -> None:
        """The volumes hold the image after `seq` again (a resync finished or rolled
        back): a new window starts there."""
        if not self.active:
            return
        await self.group.in_io(self.history.start_at, seq, self.group.journal.time_ns(seq))
        self._release()  # (the resync wrote over an interrupted promote --at's point)
        if self._resyncing:
            self._resyncing = False
            self.applier.resume()

    def start(self, guarded) -> asyncio.Task:
        """Run the applier (under the group's guard) until deactivate()."""
        self._task = asyncio.get_running_loop().create_task(
            guarded(self.applier.run(), "applier"), name=f"apply-{self.group.name}")
        return self._task

    async def deactivate(self) -> None:
        """The group leaves the secondary role: every durable record is applied first
        (the delay is over), and the history goes."""
        if self.applier is None:
            return
        if self.held:
            raise GroupError(f"{self.held}; a plain promote would apply them")
        if not self._resyncing:
            await self.applier.catch_up()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        g = self.group
        g.commit.deferred = g.commit.delayed = False
        g.commit.applier_wake = None
        self.applier = None
        self._release()
        self.history.remove()

    def _release(self) -> None:
        """No rewind in place is unfinished any more: rewind.json goes, applies may go on."""
        if os.path.exists(self._rewind_path):
            os.unlink(self._rewind_path)
            statefile.fsync_dir(self.group.dir)
        self.held = None
        if self.applier is not None:
            self.applier.held = None
            self.applier.resume_after_hold()

    def recover_rewind(self, rewind: dict) -> int:
        """Recovery found rewind.json: take the volumes back to its point again (after the
        journal was replayed through the history's last step end) and hold them there."""
        to, frm = rewind["to"], self.history.applied_seq
        g = self.group
        if not self.history.low_seq <= to <= frm:
            raise GroupError(f"group {g.name}: {self._rewind_path} says a promote --at seq "
                             f"{to} was interrupted, but the history holds seq "
                             f"{self.history.low_seq}..{frm}: the volumes cannot be taken "
                             "there; remove the file to start with what they hold (then "
                             "resync this node from its source)")
        self._undo_volumes(to, frm)
        self.history.cut_after(to, g.journal.time_ns(to))
        self.held = (f"a promote --at seq {to} was interrupted: the volumes hold seq {to}, "
                     f"the records after it are kept in the journal and not applied; run "
                     f"`replicator promote {g.name} --at {to}` again (or, to apply them after "
                     f"all, remove {self._rewind_path} and restart)")
        g.log.error("group %s: %s", g.name, self.held)
        return to

    # ---- the window ------------------------------------------------------------------
    @property
    def low_seq(self) -> int:
        return max(self.history.low_seq, self.group.journal.base.seq)

    def keep_after(self) -> int:
        """The journal keeps the records after this seq for the window."""
        return self.low_seq if self.active else 1 << 63

    async def trim(self) -> None:
        """Drop the window's oldest files while it is beyond its limits (checkpointer):
        decided here on the loop, dropped in the io worker (the history's lock may be
        held by a step's fdatasync there)."""
        if not self.active:
            return
        h, j = self.history, self.group.journal
        cutoff = time.time_ns() - self.retain_seconds * 1e9
        files, held, low = h.files(), h.nbytes, self.low_seq
        drop, why = 0, None
        while drop < len(files) - 1:
            last_seq, last_time, size = files[drop]
            in_journal = j.bytes_between(low, j.last_seq) if j.last_seq > low else 0
            if not h.images:
                why = "delay"
            elif self.retain_seconds and last_time < cutoff:
                why = "retain"
            elif self.retain_bytes and held + in_journal > self.retain_bytes:
                why = "retain"
            elif in_journal > j.capacity // 2:
                why = "journal_size"
            else:
                break
            drop, held, low = drop + 1, held - size, max(last_seq, j.base.seq)
        if not drop or not await self.group.in_io(h.drop_oldest, drop):
            return
        if why == "journal_size" and self.limited_by != why:
            self.group.log.warning("group %s: the point-in-time window is cut short by "
                                   "journal_size (the journal holds the window's records "
                                   "too): it now starts at seq %d", self.group.name,
                                   self.low_seq)
        self.limited_by = why if why == "journal_size" else None

    @property
    def retained_bytes(self) -> int:
        """The window's bytes: its history and the journal's records inside it (the
        journal may hold older ones for its own reasons: it drops whole segments)."""
        j = self.group.journal
        low = max(self.low_seq, j.base.seq)
        return self.history.nbytes + (j.bytes_between(low, j.last_seq) if j.last_seq > low else 0)

    def status(self) -> dict | None:
        if not self.configured:
            return None
        g, h = self.group, self.history
        active = self.active
        return {"active": active,
                "retain": _retain_text(self.retain_seconds, self.retain_bytes),
                "apply_delay_seconds": self.delay,
                "from_seq": self.low_seq if active and h.images else None,
                "from_time": _iso(self.start_time_ns) if active and h.images else None,
                "to_seq": g.commit.consistent_seq if active else None,
                "to_time": _iso(g.journal.time_ns(g.commit.consistent_seq)) if active else None,
                "applied_seq": g.commit.applied_seq,
                "waiting_records": self.applier.waiting if active else 0,
                "history_bytes": h.nbytes if active else 0,
                "retained_bytes": self.retained_bytes if active else 0,
                "limited_by": self.limited_by, "held": self.held,
                "delay_shortened": bool(self.applier and self.applier.hurried)}

    @property
    def start_time_ns(self) -> int:
        """When the primary journaled the window's oldest point."""
        return self._time_of(self.low_seq)

    def _time_of(self, seq: int) -> int:
        return self.group.journal.time_ns(seq) or self.history.low_time_ns

    # ---- points ----------------------------------------------------------------------
    def resolve(self, to: str) -> Point:
        """The point `to` names: SEQ, TIME (ISO 8601, or -15m for 15 minutes ago), or a
        marker (`seq:`, `time:`, `marker:` say which when a name could be either)."""
        g = self.group
        if not self.active:
            raise GroupError(f"group {g.name} keeps no point-in-time window here ("
                             + ("not a secondary now" if self.configured else
                                "retain / apply_delay are not set") + ")")
        head, colon, rest = to.partition(":")
        kind, value = (head, rest) if colon and head in ("seq", "time", "marker") else ("", to)
        if kind == "seq" and not (value.isascii() and value.isdigit()):
            raise GroupError(f"seq:{value}: expected a seq number")
        low, high = self.low_seq, g.commit.consistent_seq
        if kind == "seq" or not kind and value.isascii() and value.isdigit():
            seq = int(value)
            self._inside(seq, low, high, f"seq {seq}")
            if seq > low and self._open(seq):
                raise GroupError(f"seq {seq} is inside an epoch (not a consistent point); "
                                 f"the epoch closes at a later seq")
            return self._point(seq)
        when = _parse_time(value) if kind == "time" or not kind and _looks_like_time(value) \
            else None
        if when is not None:
            return self._point(self._at_time(when, low, high))
        marker = g.markers.named(value)
        if marker is None:
            raise GroupError(f"no marker {value!r} in group {g.name} (replicator markers "
                             f"{g.name} lists them); a time is ISO 8601 or like -15m")
        self._inside(marker.seq, low, high, f"marker {value!r} (seq {marker.seq})")
        return Point(marker.seq, marker.time_ns, marker.name)

    def _point(self, seq: int) -> Point:
        named = [m.name for m in self.group.markers if m.seq == seq]
        return Point(seq, self._time_of(seq), named[-1] if named else None)

    def _inside(self, seq: int, low: int, high: int, what: str) -> None:
        if not low <= seq <= high:
            times = (f", {_when(self._time_of(low))} .. {_when(self.group.journal.time_ns(high))}"
                     if high > low else "")
            raise GroupError(f"{what} is outside group {self.group.name}'s window here "
                             f"(seq {low}..{high}{times})")

    def _open(self, seq: int) -> bool:
        rec = next(self.group.journal.records(seq - 1, seq))
        return bool(rec.flags & FLAG_OPEN)

    def _at_time(self, when_ns: int, low: int, high: int) -> int:
        """The last consistent seq of the window journaled at or before `when_ns`."""
        j = self.group.journal
        if high <= low or j.time_ns(low + 1) > when_ns:
            if self._time_of(low) and self._time_of(low) <= when_ns:
                return low
            raise GroupError(f"{_when(when_ns)} is before group {self.group.name}'s window "
                             f"here (it starts at seq {low}, {_when(self._time_of(low))})")
        a, b = low + 1, high  # the last seq with time <= when_ns, by bisection
        while a < b:
            mid = (a + b + 1) // 2
            if j.time_ns(mid) <= when_ns:
                a = mid
            else:
                b = mid - 1
        while a > low and self._open(a):
            a -= 1
        return a

    # ---- going back ------------------------------------------------------------------
    def undo_onto(self, volumes: dict, after_seq: int, from_seq: int) -> int:
        """Worker thread: write back onto `volumes` (a copy's or the group's) what the
        records after `after_seq` through `from_seq` overwrote; returns the bytes."""
        if not self.history.images:
            raise GroupError(f"group {self.group.name} keeps no before-images (apply_delay "
                             "without retain): it cannot go back before its volumes' seq "
                             f"{from_seq}")
        return self.history.undo(after_seq, from_seq,
                                 lambda name, offset, data: volumes[name].write(offset, data))

    def _undo_volumes(self, to: int, frm: int) -> None:
        g = self.group
        if to < frm:
            self.undo_onto(g.volumes, to, frm)
        for vol in g.volumes.values():
            vol.sync()

    async def rewind_in_place(self, point: Point, keep_path: str) -> tuple[int, str]:
        """promote --at: the volumes go to `point` (forward through the journal, or back
        through the history), the records after it are copied to `keep_path` (or beside
        it), and the journal ends at it. Returns how many records were set aside, and
        where. The history is pinned (the caller resolved the point with it pinned)."""
        g = self.group
        await self.applier.hold()
        self.rewinding = True
        try:
            to = point.seq
            if to > g.commit.applied_seq:  # forward first: rewind.json then says "from: to"
                await self.applier.catch_up(to)
            frm = g.commit.applied_seq
            prior = self._rewind_state()
            if prior and prior["to"] == to and g.journal.last_seq <= to and "kept" in prior:
                kept, keep_path = prior["kept_records"], prior["kept"]  # (cut already)
            else:
                kept, keep_path = await g.in_io(self._keep, to, keep_path)
            await g.in_io(statefile.replace, self._rewind_path, json.dumps(
                {"to": to, "from": frm, "kept": keep_path, "kept_records": kept}).encode())
            await g.in_io(self._undo_volumes, to, frm)
            await g.in_io(self.history.cut_after, to, g.journal.time_ns(to))
            g.commit.applied_through(to)
            await g.save_checkpoint(g.journal.position(to))
            g.truncate_after(to)
            self.held = self.applier.held = None
            emit("rewound", g.name, to_seq=to, marker=point.marker, kept_records=kept,
                 kept=keep_path)
            return kept, keep_path
        except HistoryError as exc:
            raise GroupError(f"the history cannot take the volumes to seq {point.seq}: "
                             f"{exc}") from None
        finally:
            self.rewinding = False
            self.applier.resume()

    def _rewind_state(self) -> dict | None:
        try:
            with open(self._rewind_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _keep(self, after: int, path: str) -> tuple[int, str]:
        """Copy the journal's records after `after` to `path` (a new name beside it if a
        file set aside before is there: never replaced), durably: the records as a
        journal segment holds them (journal/record.py's layout, one after another)."""
        n, base = 0, path
        while os.path.exists(path):
            n += 1
            path = f"{base}.{n}"
        count = 0
        with open(path + ".tmp", "wb") as f:
            for first, last, data in self.group.journal.chunks(after):
                f.write(data)
                count += last - first + 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        statefile.fsync_dir(os.path.dirname(path))
        return count, path


def _looks_like_time(value: str) -> bool:
    return bool(_RELATIVE.match(value)) or bool(re.match(r"^\d{4}-\d\d-\d\d", value))


def _parse_time(value: str) -> int:
    m = _RELATIVE.match(value)
    if m:
        ns = time.time_ns() - int(float(m.group(1)) * _UNIT[m.group(2)] * 1e9)
        if ns < 0:
            raise GroupError(f"{value!r} is before 1970: before any window")
        return ns
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise GroupError(f"cannot read {value!r} as a time: expected ISO 8601 (like "
                         "2026-12-02T05:10:00Z) or -15m (15 minutes ago)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # the local time of this node
    ns = (when - _EPOCH) // timedelta(microseconds=1) * 1000  # exact: no float rounding
    if ns < 0:
        raise GroupError(f"{value!r} is before 1970: before any window")
    return ns


def _iso(time_ns: int) -> str | None:
    """To the microsecond, rounded up: given back (rewind --to), it names the same seq
    unless another record came within that microsecond."""
    if not time_ns:
        return None
    when = _EPOCH + timedelta(microseconds=-(-time_ns // 1000))
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _when(time_ns: int) -> str:
    return _iso(time_ns) or "time not known"


def _retain_text(seconds: float, nbytes: int) -> str | None:
    if seconds:
        return f"{seconds:g}s"
    return size_text(nbytes) if nbytes else None
