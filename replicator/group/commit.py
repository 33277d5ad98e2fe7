"""The commit pipeline of a group: batches, the journal append, and the written,
durable and flush points (the durability contract of DESIGN.md).

Every write to any volume of the group, whether it comes from an NBD client on the
primary or from the upstream node on a replica, goes through it, all of it on the event
loop thread (only the fdatasync runs elsewhere, a kernel AIO worker):

    submit_write / submit_records   assign or check seq, encode, queue
    _committer, _write              take everything queued as one batch, one writev
                                    into the journal's page cache; the batch is now
                                    written: readable (memtable.py), shipped early to
                                    in-sync sync targets, and its writes complete
                                    (primary: once every in-sync sync target has
                                    written it too; replica: the receiver acks it)
    commit_soon, _synced            one fdatasync for everything written (a group
                                    commit), when a FLUSH or FUA write waits for it, a
                                    shipper waits for records, the memtable grows past
                                    MEMTABLE_COMMIT_BYTES, or commit_interval passed
    _durable                        in seq order: index the batch (shippers read it),
                                    pwrite each record to its volume
    submit_flush                    completes once its writes are durable here and on
                                    every in-sync sync target (they ack durable apart)

`durability: write` makes each write wait for its commit, like a FLUSH.

Epochs (journal/record.py): a record with FLAG_OPEN is inside an epoch that goes on
after it (a watched file's changed blocks, a periodic link's coalesced batch). Such a
record is journaled and acked like any other, but neither applied to the volumes nor
shown to reads until the record that closes its epoch is: `consistent_seq` is the last
durable seq that closes one, and the volumes and the memtable only ever hold images
after a consistent seq, so a replica is always at an epoch boundary (all or nothing).
A primary's own NBD writes are each an epoch of their own.

Why a volume never holds a write that its journal lost: records reach the volumes only
once durable in the journal (_durable), and reads see the newer ones from the memtable
until then. So after kill -9 or power loss the volumes hold the image after the
checkpoint's seq, every record the journal lost is newer than anything in them, and
recovery replays the journal's durable prefix onto them: the image after some seq
k >= the last flush point (DESIGN.md invariant 1; tests/unit/test_group_powerloss.py).
The other design, writing the volume at once and resyncing an activity log of regions
with non-durable writes after a crash (DRBD), leaves a primary's own volume a mix that
no seq describes, which invariant 1 forbids; its one advantage, no memory for unapplied
writes, is bounded here by MEMTABLE_COMMIT_BYTES.

A failure never hangs: a failed writev fails its batch (and what queued behind it); a
failed fdatasync, or an exception in a loop of the group, halts the pipeline (halt):
status says why, every later write and flush gets EIO, until the agent restarts and
recovers what the journal really holds.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import deque
from typing import Callable

from ..config import GroupConfig
from ..events import emit
from ..journal.flusher import Flusher
from ..journal.record import FLAG_OPEN, Kind, RecordError, encode_header, header_crc, iterate
from ..journal.segments import Journal
from ..volume import Volume
from .links import Links, TargetLink
from .memtable import Memtable

Done = Callable[[int], None]
MEMTABLE_COMMIT_BYTES = 4 << 20  # written, not durable: past this, commit at once (memory)


class GroupError(Exception):
    """The group cannot start or cannot accept a batch."""


def wake_all(waiters: list) -> None:
    """Resolve every future in `waiters` (and empty it)."""
    pending = waiters[:]
    waiters.clear()
    for fut in pending:
        if not fut.done():
            fut.set_result(None)


def apply_to_volumes(applies) -> None:
    """Write records' effects, in order: (volume, kind, offset, length, payload)."""
    for vol, kind, offset, length, payload in applies:
        if kind == Kind.WRITE:
            vol.write(offset, payload)
        elif kind == Kind.ZERO:
            vol.zero(offset, length)


def received_records(payload, first_seq: int, last_seq: int, held: int, where: str):
    """The records of a received batch after seq `held` (the ones before it are held
    already: a resent batch), checked: the batch must follow `held` without a gap and
    hold exactly first_seq..last_seq, in order. GroupError names `where`."""
    if first_seq > held + 1:
        raise GroupError(f"{where}: records start at seq {first_seq}, expected {held + 1} (gap)")
    seq = first_seq
    try:
        for rec in iterate(payload):
            if rec.seq != seq:
                raise GroupError(f"{where}: seq {rec.seq} after {seq - 1}")
            seq += 1
            if rec.seq > held:
                yield rec
    except RecordError as exc:
        raise GroupError(f"{where}: corrupt record in batch {first_seq}..{last_seq}: "
                         f"{exc}") from None
    if seq - 1 != last_seq:
        raise GroupError(f"{where}: a batch of records {first_seq}..{last_seq} holds "
                         f"{first_seq}..{seq - 1}")


def volume_of(volumes: dict, rec, where: str):
    """The volume a received record writes, which must hold the record's extent (a
    MARKER, which writes nothing, applies like a SKIP of the first volume)."""
    if rec.kind is Kind.MARKER:
        return next(iter(volumes.values()))
    vol = volumes.get(rec.volume)
    if vol is None or rec.offset + rec.length > vol.size:
        raise GroupError(f"{where}: record {rec.seq} targets {rec.volume!r} "
                         f"[{rec.offset}, +{rec.length}), which it does not have")
    return vol


class _Batch:
    __slots__ = ("first_seq", "last_seq", "closed_seq", "bufs", "nbytes", "sizes", "hcrcs",
                 "applies", "dones", "appended", "wait_durable", "urgent")

    def __init__(self):
        self.first_seq = 0
        self.last_seq = 0
        self.closed_seq = 0  # its last record that closes an epoch (0: none does)
        self.bufs: list = []
        self.nbytes = 0
        self.sizes: list[int] = []
        self.hcrcs: list[int] = []
        self.applies: list = []  # (volume, kind, offset, length, payload), one per record
        self.dones: list = []  # (seq, done)
        self.appended = None  # the journal's handle once written
        self.wait_durable = False  # its writes complete once durable (an epoch's do)
        self.urgent = False  # made durable at once: it closes an epoch of many records

    def closed_part(self) -> int:
        """How many of its records (from the first) end at an epoch boundary."""
        return self.closed_seq - self.first_seq + 1 if self.closed_seq else 0


class Commit:
    def __init__(self, cfg: GroupConfig, journal: Journal, volumes: dict[str, Volume],
                 links: Links, log: logging.Logger, *, role: Callable[[], str], wait_for_space):
        self.cfg = cfg
        self.name = cfg.name
        self.journal = journal
        self.volumes = volumes
        self.links = links
        self.log = log
        self._role = role  # the group's role right now (promote/demote change it)
        self._wait_for_space = wait_for_space  # async (nbytes): the journal has room
        # The durability points: written_seq is in the journal's page cache and
        # readable, durable_seq fdatasync'd (and in the journal's index, and applied to
        # the volumes unless they refuse it), flush_seq the last seq a completed FLUSH
        # or FUA covered; applied_seq is what the volumes hold; consistent_seq the last
        # durable seq that closes an epoch (the image after it may be shown).
        self.written_seq = self.durable_seq = self.applied_seq = self.consistent_seq = 0
        self.flush_seq = 0
        self.flush_wanted = 0  # the highest seq a flush waits for (sync shippers pass it on)
        self.journal_no_space = False  # the last journal write failed ENOSPC
        self.halted: str | None = None  # why writes stopped for good (until a restart)
        self.volume_error: str | None = None  # why the volumes lag the journal
        self.early_senders: set = set()  # shippers taking batches before their fdatasync
        self.durable_listeners: set[Callable[[int], None]] = set()  # receivers: ack durable
        self.flusher: Flusher | None = None
        # called with each record received from upstream (analytics.py's observe)
        self.observe: Callable | None = None
        # called with each MARKER record received from upstream, as its batch is queued
        self.marked: Callable | None = None
        self._next_seq = 1
        self._batch = _Batch()
        self._unsynced: deque[_Batch] = deque()  # written, not durable yet, in seq order
        self._memtable = Memtable()  # what they wrote, for reads until they are applied
        self._syncing = False  # a commit's fdatasyncs are in flight
        self._commit_again = False  # something asked for a commit while one ran
        self._commit_timer: asyncio.TimerHandle | None = None  # commit_interval
        self._sync_waits: deque = deque()  # (seq, done): writes waiting for sync targets
        self._flush_waits: deque = deque()  # (seq, done): flushes waiting for durability
        self._record_waiters: list[asyncio.Future] = []
        self._idle_waiters: list[asyncio.Future] = []
        self._durable_waiters: list[asyncio.Future] = []
        self._kick = asyncio.Event()
        # Local writes waiting for admission, before they get a seq, in order: while a
        # switchover holds writes (_holding) or a lag guard's gate limits them (gate,
        # group/guard.py). None otherwise: the one check on the write path.
        self._admission: deque | None = None
        self._holding = False
        self.gate = None  # guard.Gate while some target's on_lag limits writes
        self._admit_timer: asyncio.TimerHandle | None = None
        # Journaled, not yet in the volumes: (last seq, applies) in seq order, held while
        # a volume refuses writes (_volume_failed).
        self._unapplied: deque[tuple[int, list]] = deque()
        self._unapplied_errno = 0
        # The open epoch's records after the last epoch boundary: what the memtable
        # (written) and the volumes (durable) get once a record closes it.
        self._open_written: list = []  # (seq, volume name, offset, length, payload)
        self._open_durable: list = []  # (volume, kind, offset, length, payload)
        self._in_epoch = False  # the last record received has FLAG_OPEN
        # A secondary that keeps a history or applies late (group/applier.py): durable
        # records are applied by the applier, not here; `delayed` ones are not shown to
        # reads either (the memtable would hold the whole delay).
        self.deferred = False
        self.delayed = False
        self.applier_wake: Callable[[], None] | None = None

    def reset(self, seq: int, consistent: int | None = None, open_tail=(),
              applied: int | None = None) -> None:
        """The journal holds records through `seq`, the volumes the image after
        `consistent` (seq itself unless an epoch does not close yet), and `open_tail` are
        the applies of the records after it: everything starts from there (opened and
        replayed, or a resync finished). A watched primary passes no applies: its files
        hold them. A deferred secondary's volumes hold the image after `applied`."""
        self.written_seq = self.durable_seq = seq
        self.applied_seq = self.consistent_seq = seq if consistent is None else consistent
        if applied is not None:
            self.applied_seq = applied
        self._next_seq = seq + 1
        self._unapplied.clear()
        self._memtable = Memtable()  # (the volumes hold all it could show)
        self._in_epoch = self.consistent_seq < seq
        self._open_durable = list(open_tail)
        self._open_written = [(s, vol.name, off, n, data if kind == Kind.WRITE else None)
                              for s, (vol, kind, off, n, data)
                              in enumerate(open_tail, self.applied_seq + 1)]
        self.volume_error = None

    def drop_open_epoch(self) -> None:
        """The journal was cut back to `consistent_seq` (a replica promoted with an epoch
        that never closed): forget the open epoch's records. Call settled."""
        self.written_seq = self.durable_seq = self.consistent_seq
        self._next_seq = self.consistent_seq + 1
        self._open_written, self._open_durable, self._in_epoch = [], [], False

    def start(self):
        """On the loop: the committer, a coroutine for the group to run (and guard)."""
        self.flusher = Flusher(asyncio.get_running_loop(), log=self.log)
        return self._committer()

    def halt(self, why: str) -> None:
        """Stop accepting writes for good (until a restart), failing what waits."""
        if self.halted is None:
            self.halted = why
            self.log.error("group %s: %s", self.name, why)
        self._fail_waiting(errno.EIO)
        self._fail_pending(errno.EIO)
        for waits in (self._sync_waits, self._flush_waits):
            while waits:
                waits.popleft()[1](errno.EIO)
        wake_all(self._idle_waiters)
        wake_all(self._durable_waiters)
        wake_all(self._record_waiters)

    async def stop(self) -> None:
        """The committer was cancelled: make what is written durable and applied, fail
        what still waits, close the Flusher."""
        self._fail_waiting(errno.ESHUTDOWN)
        if self._admit_timer is not None:
            self._admit_timer.cancel()
        if self._batch.dones:
            self._fail_pending(errno.ESHUTDOWN)
        await self.settle()
        while self._syncing:  # a halted pipeline still waits for its fdatasync in flight
            await self._wait(self._durable_waiters)
        self.flusher.close()
        for waits in (self._sync_waits, self._flush_waits):
            while waits:
                waits.popleft()[1](errno.ESHUTDOWN)

    def submit_write(self, volume: Volume, offset: int, data, done: Done) -> None:
        """Primary: journal and apply one WRITE; done(0) once it completes under the
        durability contract (see the module docstring)."""
        self._queue_local(volume, Kind.WRITE, offset, len(data), data, done)

    def submit_zero(self, volume: Volume, offset: int, length: int, done: Done) -> None:
        self._queue_local(volume, Kind.ZERO, offset, length, b"", done)

    def submit_flush(self, done: Done) -> None:
        """NBD FLUSH (and the flush half of a FUA write): done(0) once every write that
        completed before it is durable here and on every in-sync sync target."""
        if self.halted:
            done(errno.EIO)
            return
        seq = self.written_seq
        if seq <= self.durable_seq and seq <= self.links.durable_floor():
            self.flush_seq = max(self.flush_seq, seq)
            done(0)
            return
        self._flush_waits.append((seq, done))
        self.flush_wanted = max(self.flush_wanted, seq)
        self.commit_soon()
        wake_all(self._record_waiters)  # sync shippers pass the flush on

    @property
    def submitted_seq(self) -> int:
        """The last seq queued here, written to the journal or not yet."""
        return self._next_seq - 1

    def read(self, volume: Volume, offset: int, length: int) -> bytes:
        """What a client reads: the volume, with completed writes not applied yet."""
        return self._memtable.overlay(volume.name, offset, volume.read(offset, length))

    def hold_writes(self) -> None:
        """Switchover: new writes wait (uncompleted) until release_writes()."""
        self._holding = True
        if self._admission is None:
            self._admission = deque()

    def release_writes(self) -> None:
        """Queue the held writes: written if this node is still primary, else refused
        (as far as a lag gate lets them go; the rest wait for it, in order)."""
        self._holding = False
        self.admit()

    def set_gate(self, gate) -> None:
        """The lag guard (group/guard.py): from now on local writes go as `gate` lets
        them (None: freely); the waiting ones go as far as it lets them now."""
        self.gate = gate
        if gate is not None and self._admission is None:
            self._admission = deque()
        self.admit()

    def admit(self) -> None:
        """Give the waiting local writes their seqs, in order, as far as the hold and
        the gate let them; when neither holds any more, writes go straight again."""
        waiting = self._admission
        if self._holding or waiting is None:
            return
        if self._admit_timer is not None:
            self._admit_timer.cancel()
            self._admit_timer = None
        gate = self.gate
        while waiting:
            if gate is not None and not self._refusal():  # a refusal goes at once
                item = waiting[0]
                wait = gate.wait(item[3] if item[1] == Kind.WRITE else 0)
                if wait > 0:
                    if wait != float("inf"):  # else the guard's next look admits it
                        self._admit_timer = asyncio.get_running_loop().call_later(
                            wait, self.admit)
                    return
            self._take_local(*waiting.popleft())
        if gate is None:
            self._admission = None

    def _fail_waiting(self, err: int) -> None:
        waiting, self._admission = self._admission, (deque() if self._holding or self.gate
                                                     else None)
        for *_, done in waiting or ():
            done(err)

    def _queue_local(self, volume, kind, offset, length, payload, done) -> None:
        if self._admission is not None:  # held, or gated: in order behind the others
            self._admission.append((volume, kind, offset, length, payload, done))
            self.admit()
            return
        self._take_local(volume, kind, offset, length, payload, done)

    def _take_local(self, volume, kind, offset, length, payload, done) -> None:
        err = self._refusal() or (self._unapplied_errno if self._unapplied else 0)
        if err:  # (unapplied: the volumes lack journaled records; see _durable)
            done(err)
            return
        b = self._batch
        seq = b.closed_seq = self._append(volume.name_bytes, kind, offset, length, payload,
                                          time.time_ns())
        b.applies.append((volume, kind, offset, length, payload))
        b.dones.append((seq, done))

    def submit_marker(self, name: str, consistent: bool, done: Done) -> tuple[int, int]:
        """Primary: journal a MARKER record named `name` (journal/record.py); done(0) once
        written, like a write (a FLUSH after it makes it durable). Refused while a
        switchover holds writes: the marker would land on either side of it."""
        err = errno.EBUSY if self._holding else self._refusal()
        if err:
            done(err)
            return 0, 0
        b, now = self._batch, time.time_ns()
        seq = b.closed_seq = self._append(name.encode(), Kind.MARKER, int(consistent), 0, b"", now)
        b.applies.append((next(iter(self.volumes.values())), Kind.MARKER, 0, 0, b""))
        b.dones.append((seq, done))
        return seq, now

    def _refusal(self) -> int:
        """Why a local record is refused now (an errno), or 0."""
        return errno.EROFS if self._role() != "primary" else errno.EIO if self.halted else 0

    def _append(self, name: bytes, kind, offset, length, payload, time_ns: int,
                flags: int = 0) -> int:
        """Give a local record the next seq and queue it in the batch; returns the seq."""
        seq = self._next_seq
        self._next_seq = seq + 1
        hdr = encode_header(seq, name, offset, length, kind, time_ns, payload, flags)
        b = self._batch
        if not b.sizes:  # the batch's first record
            b.first_seq = seq
            self._kick.set()
        b.last_seq = seq
        b.bufs.append(hdr)
        size = len(hdr)
        if kind == Kind.WRITE:
            b.bufs.append(payload)
            size += len(payload)
        b.nbytes += size
        b.sizes.append(size)
        b.hcrcs.append(header_crc(hdr))
        return seq

    def submit_epoch(self, items: list, done: Done, *, last: bool = True) -> None:
        """Primary of a watched group: journal a watched file's changed blocks, items of
        (volume, kind, offset, length, payload), as (part of) one epoch: every record but
        the last of the last part carries FLAG_OPEN. They are not applied to the volumes
        nor shown to reads (the watched files hold them already). done(0) once durable.
        An empty last part closes an epoch left open (a crash mid-epoch) with a SKIP."""
        err = self._refusal()
        if err:
            done(err)
            return
        if not items:
            if not last or self.consistent_seq == self._next_seq - 1:
                done(0)
                return
            items = [(next(iter(self.volumes.values())), Kind.SKIP, 0, 0, b"")]
        b, now = self._batch, time.time_ns()
        for i, (volume, kind, offset, length, payload) in enumerate(items, 1):
            closes = last and i == len(items)
            seq = self._append(volume.name_bytes, kind, offset, length, payload, now,
                               0 if closes else FLAG_OPEN)
            if closes:
                b.closed_seq = seq
        b.wait_durable = True
        b.dones.append((b.last_seq, done))

    def submit_records(self, first_seq: int, last_seq: int, payload: bytes, done: Done) -> None:
        """Replica: journal and apply records received from upstream, as they are;
        done(0) once written to the journal (durable_listeners hear when they are
        durable). Records we already hold are skipped (a resent batch); a gap or a
        record that does not fit this group raises GroupError and nothing is queued."""
        expected = self._next_seq
        where = f"group {self.name}"
        journal_only = self._role() == "bunker" or self.delayed
        sizes, hcrcs, applies, closed, marks = [], [], [], 0, []
        inside, closes = self._in_epoch, False
        observe = self.observe
        for rec in received_records(payload, first_seq, last_seq, expected - 1, where):
            if observe is not None:
                observe(rec.volume, rec.offset, rec.length, rec.kind, rec.payload, rec.time_ns)
            if rec.kind is Kind.MARKER:
                marks.append(rec)
            sizes.append(rec.size)
            hcrcs.append(rec.hcrc)
            if rec.flags:  # FLAG_OPEN (the only flag)
                inside = True
            else:
                closed = rec.seq
                if inside:
                    closes, inside = True, False
            vol = volume_of(self.volumes, rec, where) if self._role() != "bunker" else None
            if not journal_only:
                applies.append((vol, rec.kind, rec.offset, rec.length, rec.payload))
        skip = len(payload) - sum(sizes)  # the records held already come first
        if not sizes:
            done(0)
            return
        if self.halted:
            done(errno.EIO)
            return
        self._next_seq = last_seq + 1
        self._in_epoch = inside
        b = self._batch
        if not b.dones:
            b.first_seq = expected
            self._kick.set()
        b.last_seq = last_seq
        b.closed_seq = closed or b.closed_seq
        # The end of an epoch of many records (a watched file's, a periodic link's) is a
        # consistent point, like an application's flush: durable and applied at once,
        # not a commit_interval later.
        b.urgent = b.urgent or closes
        chunk = memoryview(payload)[skip:]
        b.bufs.append(chunk)
        b.nbytes += len(chunk)
        b.sizes.extend(sizes)
        b.hcrcs.extend(hcrcs)
        b.applies.extend(applies)
        b.dones.append((last_seq, done))
        if self.marked is not None:
            for rec in marks:
                self.marked(rec.seq, rec.volume, rec.time_ns, rec.offset == 1)

    async def _committer(self) -> None:
        """Writes each batch into the journal as soon as it exists (one writev, on the
        loop) and completes its writes (_written); durability follows in _commit."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self.halted:
                self._fail_pending(errno.EIO)
                continue
            batch, self._batch = self._batch, _Batch()
            if not batch.dones:
                continue
            await self._wait_for_space(batch.nbytes)
            if self._unsynced and self.journal.starts_segment(batch.nbytes):
                # Every segment but the last is durable to its end, so a power loss
                # can only ever tear the last one (journal/segments.py, recovery).
                await self.commit_now()
            if self.halted:
                for _, done in batch.dones:
                    done(errno.EIO)
                continue
            self._write(batch)

    def _write(self, batch: _Batch) -> None:
        """Loop: one writev of the batch into the journal's page cache. It is then
        readable (memtable), shipped early to in-sync sync targets, and its writes
        complete (or wait for the sync targets); a failed writev fails the batch."""
        try:
            batch.appended = self.journal.append(batch.first_seq, batch.bufs, batch.sizes,
                                                 batch.hcrcs)
        except OSError as exc:  # a full disk, say: this batch and those queued behind fail
            err = exc.errno or errno.EIO
            self.log.error("group %s: journal write of seq %d..%d failed: %s",
                           self.name, batch.first_seq, batch.last_seq, os.strerror(err))
            if err == errno.ENOSPC:  # beyond what the journal reserved (a huge batch)
                self.journal_no_space = True
            for _, done in batch.dones:
                done(err)
            self._fail_pending(err)
            return
        self.journal_no_space = False
        self._unsynced.append(batch)
        self.written_seq = batch.last_seq
        if batch.applies:  # not a bunker's, nor a watched primary's epoch
            self._show(batch)
        if self.early_senders:  # in the page cache now: ship while it is not durable yet
            self._send_early(batch)
        if self._role() != "primary":
            for _, done in batch.dones:  # written: the receiver acks it
                done(0)
        elif self.cfg.durability == "write" or batch.wait_durable:
            self._flush_waits.extend(batch.dones)
            self.flush_wanted = max(self.flush_wanted, batch.last_seq)
        else:
            floor = self.links.written_floor()
            for seq, done in batch.dones:
                if seq <= floor:
                    done(0)
                else:
                    self._sync_waits.append((seq, done))
        batch.dones = []
        if self._record_waiters:
            # Shippers look again: one that still lacks records (not sent early) asks
            # for a commit (wait_for_records), one the early send served does not.
            wake_all(self._record_waiters)
        if self._flush_waits or self._memtable.nbytes > MEMTABLE_COMMIT_BYTES or \
                self._idle_waiters or batch.urgent:
            self.commit_soon()
        elif self._commit_timer is None:
            self._commit_timer = asyncio.get_running_loop().call_later(
                self.cfg.commit_interval, self._commit_due)

    def _show(self, batch: _Batch) -> None:
        """Loop: what reads see of a written batch: its records through the last one
        that closes an epoch (with the open epoch's earlier ones); the rest once a later
        record closes their epoch."""
        records = ((seq, vol.name, offset, length, payload if kind == Kind.WRITE else None)
                   for seq, (vol, kind, offset, length, payload)
                   in enumerate(batch.applies, batch.first_seq))
        if batch.closed_seq == batch.last_seq and not self._open_written:  # no epoch open
            self._memtable.add(batch.last_seq, records)
            return
        records = list(records)
        n = batch.closed_part()
        if n:
            self._memtable.add(batch.closed_seq, self._open_written + records[:n])
            self._open_written = records[n:]
        else:
            self._open_written.extend(records)

    def _commit_due(self) -> None:
        self._commit_timer = None
        self.commit_soon()

    def commit_soon(self) -> None:
        """Make everything written durable now: one fdatasync for all of it (a group
        commit), or, while one runs, another right after it for what came since."""
        if self._syncing:
            self._commit_again = True
            return
        if not self._unsynced or self.halted:
            return
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        through = self._unsynced[-1].last_seq
        self._syncing = True
        self.journal.sync([b.appended for b in self._unsynced], self.flusher.fdatasync,
                          lambda err: self._synced(through, err))

    def _synced(self, through: int, err: int) -> None:
        """Loop: the commit through `through` ended (its fdatasyncs)."""
        self._syncing = False
        if err:
            # Records that completed may be lost: nobody may build on them (a restart
            # recovers what the journal really holds).
            self.halt(f"the journal's fdatasync failed ({os.strerror(err)}) "
                      f"with seq {self._unsynced[0].first_seq}..{through} written: no "
                      "more writes until the agent restarts")
            return
        self.durable_seq = through
        unsynced = self._unsynced
        while unsynced and unsynced[0].last_seq <= through:
            self._durable(unsynced.popleft())
        self._memtable.drop_through(self.applied_seq)
        self.journal_no_space = False
        self._release_flushes()
        wake_all(self._durable_waiters)
        for listener in list(self.durable_listeners):
            listener(through)
        wake_all(self._record_waiters)  # shippers send what is durable
        again, self._commit_again = self._commit_again, False
        if self._unsynced and (again or self._flush_waits or self._record_waiters
                               or self._idle_waiters):
            self.commit_soon()
        elif self._unsynced and self._commit_timer is None:
            self._commit_timer = asyncio.get_running_loop().call_later(
                self.cfg.commit_interval, self._commit_due)
        if not self._unsynced and not self._batch.dones:
            wake_all(self._idle_waiters)

    def _durable(self, batch: _Batch) -> None:
        """Loop: the batch is durable. Index it (shippers read it from now on) and
        apply it to the volumes (page cache writes, in seq order).

        A volume write that fails (ENOSPC on a sparse image, EIO) leaves a record that
        is journaled, maybe replicated, but not in the volume. The batch then waits in
        `_unapplied`, with every batch after it (the volumes stay a prefix of the
        journal; the memtable keeps serving their writes), `applied_seq` and with it the
        checkpoint stay before it (so a restart replays it), the checkpointer retries it
        every second, and until the volumes have taken them all the primary refuses new
        writes."""
        self.journal.commit(batch.appended)
        n = batch.closed_part()
        if not n:
            self._open_durable.extend(batch.applies)
            return
        if self.deferred:  # the applier applies it (group/applier.py)
            self.consistent_seq = batch.closed_seq
            self._open_durable = []
            self.applier_wake()
            return
        if batch.urgent:  # it closes an epoch of many records
            emit("epoch_applied", self.name, through_seq=batch.closed_seq,
                 records=batch.closed_seq - self.consistent_seq)
        self.consistent_seq = batch.closed_seq
        if n == len(batch.applies) and not self._open_durable:  # no epoch open
            applies = batch.applies
        else:
            applies, self._open_durable = (self._open_durable + batch.applies[:n],
                                           batch.applies[n:])
        if not self._unapplied:
            try:
                apply_to_volumes(applies)
            except OSError as exc:
                self._volume_failed(batch.first_seq, batch.closed_seq, applies, exc)
                return
            self.applied_seq = batch.closed_seq
        else:
            self._unapplied.append((batch.closed_seq, applies))

    def applied_through(self, seq: int) -> None:
        """The applier: the volumes hold the image after `seq` now."""
        self.applied_seq = seq
        self.volume_error = None
        self._memtable.drop_through(seq)

    def _release_flushes(self) -> None:
        """Complete the flushes (and durability: write writes) now durable everywhere
        they must be: here and on every in-sync sync target."""
        waits = self._flush_waits
        floor = min(self.durable_seq, self.links.durable_floor())
        while waits and waits[0][0] <= floor:
            seq, done = waits.popleft()
            self.flush_seq = max(self.flush_seq, seq)
            done(0)

    def _volume_failed(self, first: int, last: int, applies: list, exc: OSError) -> None:
        self._unapplied.append((last, applies))
        self._unapplied_errno = exc.errno or errno.EIO
        until = ("writes are refused until the volumes take every journaled record"
                 if self._role() == "primary" else "records are journaled, not applied, until "
                 "the volumes take them")
        self.volume_error = (f"a volume write failed after seq {first}..{last} "
                             f"was journaled ({exc}); {until} (retried every second)")
        self.log.error("group %s: %s", self.name, self.volume_error)

    def retry_applies(self) -> None:
        """Checkpointer (loop): apply the journaled batches the volumes refused, in order."""
        if not self._unapplied:
            return
        while self._unapplied:
            last, applies = self._unapplied[0]
            try:
                apply_to_volumes(applies)
            except OSError as exc:
                self.log.debug("group %s: volume write of seq %d..%d still fails: %s",
                               self.name, self.applied_seq + 1, last, exc)
                return
            self._unapplied.popleft()
            self.applied_seq = last
        self._memtable.drop_through(self.applied_seq)
        self.log.warning("group %s: the volumes hold every journaled record again (through "
                         "seq %d); writes are accepted", self.name, self.applied_seq)
        self.volume_error = None
        wake_all(self._record_waiters)

    async def commit_now(self) -> None:
        """Make everything written so far durable (and applied) before returning."""
        target = self.written_seq
        while self.durable_seq < target and not self.halted:
            self.commit_soon()
            await self._wait(self._durable_waiters)

    @staticmethod
    async def _wait(waiters: list) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        await fut

    async def settle(self) -> None:
        """Wait until nothing is queued, written but not durable, or being committed:
        the journal's last record is then everything this node has accepted, and the
        volumes hold it."""
        while (self._batch.dones or self._unsynced or self._syncing) and not self.halted:
            self.commit_soon()
            await self._wait(self._idle_waiters)

    def _send_early(self, batch: _Batch) -> None:
        """Loop: hand a batch whose journal write is done (not durable yet) to the
        shippers that take it early (in-sync sync targets)."""
        for send in list(self.early_senders):
            send(batch.first_seq, batch.last_seq, batch.bufs)

    def _fail_pending(self, err: int) -> None:
        pending, self._batch = self._batch, _Batch()
        for _, done in pending.dones:
            done(err)
        self._next_seq = self.written_seq + 1

    def links_changed(self) -> None:
        """A target acked or changed state: release the writes and flushes now covered."""
        floor = self.links.written_floor()
        waits = self._sync_waits
        while waits and waits[0][0] <= floor:
            waits.popleft()[1](0)
        self._release_flushes()

    def fail_sync_waits(self, t: TargetLink, err: int) -> int:
        """Complete with `err` every write and flush waiting for `t` (a seq it has not
        written, or not made durable): a sync target with on_disconnect: block that
        stopped acknowledging. Returns how many."""
        failed = 0
        for name, reached in (("_sync_waits", t.written_seq), ("_flush_waits", t.acked_seq)):
            keep = deque()
            for seq, done in getattr(self, name):
                if seq > reached:
                    done(err)
                    failed += 1
                else:
                    keep.append((seq, done))
            setattr(self, name, keep)
        return failed

    def poke_readers(self) -> None:
        """Wake every shipper waiting for records (one has other work queued)."""
        wake_all(self._record_waiters)

    async def wait_for_records(self, after_seq: int, timeout: float) -> bool:
        """Wait until a record after `after_seq` is durable; False on timeout. A shipper
        waiting for records that are written makes them durable now."""
        if self.journal.last_seq > after_seq:
            return True
        if self.written_seq > after_seq:
            self.commit_soon()
        fut = asyncio.get_running_loop().create_future()
        self._record_waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        return self.journal.last_seq > after_seq
