"""A consistency group on one node: the write path and its ordering.

Every write to any volume of the group, whether it comes from an NBD client on the
primary or from the upstream node on a replica, goes through one pipeline:

    submit_write / submit_records   (loop thread)  assign or check seq, encode, queue
    _committer                      (loop thread)  take everything queued as one batch
      worker thread                                one writev + one fdatasync of the
                                                   journal, then pwrite each record to
                                                   its volume, in seq order
    _committer                      (loop thread)  index the batch, wake the shippers,
                                                   complete each write as soon as every
                                                   in-sync sync target has acked it

So a write completes only when it is durable in the local journal, visible in the local
volume and (for sync targets) durable on those targets. Batches are serial, so the
volumes always show a prefix of the journal (DESIGN.md invariant 1).

Checkpoints make the volumes durable (fdatasync) and record the seq they hold in
`group.json`, together with every target's acked seq; the journal is then trimmed up
to min(checkpoint, acked of every target). Recovery replays the journal past the
checkpoint onto the volumes, so kill -9 at any point leaves a consistent group.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .config import GroupConfig
from .journal.record import Kind, RecordError, encode_header, header_crc, iterate
from .journal.segments import Journal, JournalError, Position
from .volume import Volume

Done = Callable[[int], None]
CHECKPOINT_INTERVAL = 1.0
MAX_IN_FLIGHT = 2


def _wake(waiters: list) -> None:
    pending = waiters[:]
    waiters.clear()
    for fut in pending:
        if not fut.done():
            fut.set_result(None)


class GroupError(Exception):
    """The group cannot start or cannot accept a batch."""


class TargetLink:
    """What the write path needs to know of one target; its shipper keeps it current."""

    def __init__(self, node: str, mode: str, acked_seq: int):
        self.node = node
        self.mode = mode
        self.acked_seq = acked_seq
        self.in_sync = False  # connected and caught up: sync writes wait for it


class _Batch:
    __slots__ = ("first_seq", "last_seq", "bufs", "nbytes", "sizes", "hcrcs", "applies", "dones")

    def __init__(self):
        self.first_seq = 0
        self.last_seq = 0
        self.bufs: list = []
        self.nbytes = 0
        self.sizes: list[int] = []
        self.hcrcs: list[int] = []
        self.applies: list = []  # (volume, kind, offset, length, payload)
        self.dones: list = []  # (seq, done)


class Group:
    def __init__(self, cfg: GroupConfig, state_dir: str, log: logging.Logger | None = None):
        self.cfg = cfg
        self.name = cfg.name
        self.role = cfg.role
        self.dir = os.path.join(state_dir, "groups", cfg.name)
        self.log = log or logging.getLogger(f"replicator.group.{cfg.name}")
        self.volumes = {v.name: Volume(v.name, v.path, v.size) for v in cfg.volumes}
        self.journal = Journal(os.path.join(self.dir, "journal"), capacity=cfg.journal_size)
        self.targets: dict[str, TargetLink] = {}
        self.checkpoint = Position(0, 0)
        self.applied_seq = 0
        self.journal_full = False
        self._next_seq = 1
        self._batch = _Batch()
        self._sync_waits: deque = deque()  # (seq, done), seq ascending
        self._record_waiters: list[asyncio.Future] = []
        self._idle_waiters: list[asyncio.Future] = []
        self._in_flight = 0  # batches handed to the commit worker, not yet completed
        self._poisoned = False  # a batch failed: the worker writes nothing until reset
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"commit-{cfg.name}")
        self._kick = asyncio.Event()
        self._slot = asyncio.Event()
        self._space = asyncio.Event()
        self._checkpoint_now = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._saved_acked: dict = {}

    # ---- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        """Open volumes, recover the journal and replay it onto the volumes."""
        os.makedirs(self.dir, exist_ok=True)
        for vol in self.volumes.values():
            vol.open()
        self.journal.open()
        state = self._read_state()
        self.checkpoint = Position(*state.get("checkpoint", (0, 0)))
        acked = state.get("acked", {})
        for t in self.cfg.targets:
            self.targets[t.node] = TargetLink(t.node, t.mode, int(acked.get(t.node, 0)))
        j = self.journal
        if not j.base.seq <= self.checkpoint.seq <= j.last_seq:
            raise GroupError(
                f"group {self.name}: volumes were checkpointed at seq {self.checkpoint.seq} "
                f"but the journal holds {j.first_seq}..{j.last_seq}; the journal under "
                f"{j.directory} is missing records")
        if j.position(self.checkpoint.seq) != self.checkpoint:
            raise GroupError(f"group {self.name}: journal record {self.checkpoint.seq} does "
                             "not match the checkpoint (journal replaced?)")
        replayed = self._replay(self.checkpoint.seq)
        self.applied_seq = j.last_seq
        self._next_seq = j.last_seq + 1
        if replayed:
            self.log.info("group %s: replayed %d journal records onto the volumes",
                          self.name, replayed)
            self._sync_and_save(j.position())

    def _replay(self, after_seq: int) -> int:
        seq, count = after_seq + 1, 0
        while seq <= self.journal.last_seq:
            first, last, data = self.journal.read(seq, 8 << 20)
            applies = [(self.volumes[r.volume], r.kind, r.offset, r.length, r.payload)
                       for r in iterate(data)]
            self._apply(applies)
            count += last - first + 1
            seq = last + 1
        return count

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._committer(), name=f"commit-{self.name}"),
                       asyncio.create_task(self._checkpointer(), name=f"checkpoint-{self.name}")]

    async def stop(self) -> None:
        """Finish what is queued, checkpoint, close files."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._batch.dones:
            self._fail_pending(errno.ESHUTDOWN)
        for _, done in self._sync_waits:
            done(errno.ESHUTDOWN)
        self._sync_waits.clear()
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.applied_seq))
        self._io.shutdown()
        self.journal.close()
        for vol in self.volumes.values():
            vol.close()

    # ---- the write path (loop thread) ------------------------------------------------
    def submit_write(self, volume: Volume, offset: int, data, done: Done) -> None:
        """Primary: journal and apply one WRITE; done(0) when durable as the mode asks."""
        self._queue_local(volume, Kind.WRITE, offset, len(data), data, done)

    def submit_zero(self, volume: Volume, offset: int, length: int, done: Done) -> None:
        self._queue_local(volume, Kind.ZERO, offset, length, b"", done)

    def _queue_local(self, volume, kind, offset, length, payload, done) -> None:
        seq = self._next_seq
        self._next_seq = seq + 1
        hdr = encode_header(seq, volume.name_bytes, offset, length, kind, time.time_ns(), payload)
        b = self._batch
        if not b.dones:
            b.first_seq = seq
            self._kick.set()
        b.last_seq = seq
        b.bufs.append(hdr)
        size = len(hdr)
        if payload:
            b.bufs.append(payload)
            size += len(payload)
        b.nbytes += size
        b.sizes.append(size)
        b.hcrcs.append(header_crc(hdr))
        b.applies.append((volume, kind, offset, length, payload))
        b.dones.append((seq, done))

    def submit_records(self, first_seq: int, last_seq: int, payload: bytes, done: Done) -> None:
        """Replica: journal and apply records received from upstream, as they are.
        Records we already hold are skipped (a resent batch); a gap or a record that
        does not fit this group raises GroupError and nothing is queued."""
        expected = self._next_seq
        if first_seq > expected:
            raise GroupError(f"group {self.name}: records start at seq {first_seq}, "
                             f"expected {expected} (gap)")
        sizes, hcrcs, applies = [], [], []
        seq, skip = first_seq, 0
        try:
            for rec in iterate(payload):
                if rec.seq != seq:
                    raise GroupError(f"seq {rec.seq} after {seq - 1} in group {self.name}")
                seq += 1
                if rec.seq < expected:
                    skip += rec.size
                    continue
                vol = self.volumes.get(rec.volume)
                if vol is None or rec.offset + rec.length > vol.size:
                    raise GroupError(f"record {rec.seq} targets {rec.volume!r} "
                                     f"[{rec.offset}, +{rec.length}) which group "
                                     f"{self.name} does not have")
                sizes.append(rec.size)
                hcrcs.append(rec.hcrc)
                applies.append((vol, rec.kind, rec.offset, rec.length, rec.payload))
        except RecordError as exc:
            raise GroupError(f"group {self.name}: corrupt record in batch "
                             f"{first_seq}..{last_seq}: {exc}") from None
        if seq - 1 != last_seq:
            raise GroupError(f"batch claims {first_seq}..{last_seq} but holds "
                             f"{first_seq}..{seq - 1}")
        if not applies:
            done(0)
            return
        self._next_seq = last_seq + 1
        b = self._batch
        if not b.dones:
            b.first_seq = expected
            self._kick.set()
        b.last_seq = last_seq
        chunk = memoryview(payload)[skip:]
        b.bufs.append(chunk)
        b.nbytes += len(chunk)
        b.sizes.extend(sizes)
        b.hcrcs.extend(hcrcs)
        b.applies.extend(applies)
        b.dones.append((last_seq, done))

    async def _committer(self) -> None:
        """Hands batches to the single commit worker as soon as they exist, up to
        MAX_IN_FLIGHT at once, so the worker starts the next fdatasync while the loop
        is still completing the previous batch. The worker runs them in order."""
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._in_flight >= MAX_IN_FLIGHT or self._poisoned:
                await self._slot.wait()
                self._slot.clear()
            batch, self._batch = self._batch, _Batch()
            if not batch.dones:
                continue
            await self._wait_for_space(batch.nbytes)
            seg, fd, at = self.journal.reserve(batch.first_seq, batch.nbytes)
            self._in_flight += 1
            fut = loop.run_in_executor(self._io, self._write_batch, fd, at, batch)
            fut.add_done_callback(lambda f, b=batch, s=seg: self._batch_done(f, b, s))

    def _batch_done(self, fut, batch: _Batch, seg) -> None:
        self._in_flight -= 1
        self._slot.set()
        exc = fut.exception()
        if exc is not None:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            self.log.error("group %s: journal write of seq %d..%d failed: %s",
                           self.name, batch.first_seq, batch.last_seq, exc)
            for _, done in batch.dones:
                done(err)
        else:
            self._completed(batch, seg)
        if self._in_flight == 0:
            if self._poisoned:
                # Seqs of the failed batches are free again: fail what queued behind
                # them and restart numbering after the last durable record.
                self.journal.cancel_reservations()
                self._fail_pending(errno.EIO)
                self._poisoned = False
            if not self._batch.dones:
                _wake(self._idle_waiters)

    def _completed(self, batch: _Batch, seg) -> None:
        """Loop: the batch is durable. Apply it to the volumes (page cache writes, in
        seq order, before any later batch), index it, wake shippers, complete writes."""
        self.journal.commit(seg, batch.sizes, batch.hcrcs)
        try:
            self._apply(batch.applies)
        except OSError as exc:
            # Durable in the journal (replayed at the next start) but not in the volume.
            self.log.error("group %s: volume write failed after journaling seq %d..%d: %s",
                           self.name, batch.first_seq, batch.last_seq, exc)
            for _, done in batch.dones:
                done(exc.errno or errno.EIO)
            return
        self.applied_seq = batch.last_seq
        _wake(self._record_waiters)
        floor = self.sync_floor()
        for seq, done in batch.dones:
            if seq <= floor:
                done(0)
            else:
                self._sync_waits.append((seq, done))

    async def settle(self) -> None:
        """Wait until nothing is queued or being committed (the journal's last record
        is then everything this node has accepted)."""
        while self._batch.dones or self._in_flight:
            fut = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            await fut

    def _write_batch(self, fd: int, at: int, batch: _Batch) -> None:
        """Worker thread: one writev and one fdatasync, nothing else, so the worker
        needs the GIL twice per batch. After one failure every later batch fails
        unwritten until the loop resets, so the journal never gets a gap in seq."""
        if self._poisoned:
            raise OSError(errno.EIO, "an earlier batch failed")
        try:
            Journal.write(fd, batch.bufs, at)
        except BaseException:
            self._poisoned = True
            raise

    @staticmethod
    def _apply(applies) -> None:
        for vol, kind, offset, length, payload in applies:
            if kind == Kind.WRITE:
                vol.write(offset, payload)
            else:
                vol.zero(offset, length)

    def _fail_pending(self, err: int) -> None:
        pending, self._batch = self._batch, _Batch()
        for _, done in pending.dones:
            done(err)
        self._next_seq = self.journal.last_seq + 1

    # ---- sync targets ------------------------------------------------------------------
    def sync_floor(self) -> float:
        """Highest seq every in-sync sync target has acked (inf when none must be waited for)."""
        floor = float("inf")
        for t in self.targets.values():
            if t.mode == "sync" and t.in_sync and t.acked_seq < floor:
                floor = t.acked_seq
        return floor

    def targets_changed(self) -> None:
        """A target acked or changed state: release sync writes now covered, and let
        a waiting committer retry trimming."""
        floor = self.sync_floor()
        waits = self._sync_waits
        while waits and waits[0][0] <= floor:
            waits.popleft()[1](0)
        if self.journal_full:
            self._checkpoint_now.set()

    # ---- readers: shippers ---------------------------------------------------------------
    async def wait_for_records(self, after_seq: int, timeout: float) -> bool:
        """Wait until a record after `after_seq` is durable; False on timeout."""
        if self.journal.last_seq > after_seq:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._record_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return False
        return self.journal.last_seq > after_seq

    # ---- space, checkpoints, trimming -------------------------------------------------
    def _needed_after(self) -> int:
        low = self.checkpoint.seq
        for t in self.targets.values():
            low = min(low, t.acked_seq)
        return low

    async def _wait_for_space(self, nbytes: int) -> None:
        j = self.journal
        while True:
            needed = j.bytes_between(self._needed_after(), j.last_seq)
            if needed == 0 or needed + nbytes <= j.capacity:
                if self.journal_full:
                    self.log.info("group %s: journal has room again", self.name)
                self.journal_full = False
                return
            if not self.journal_full:
                self.log.warning("group %s: journal full (%d of %d bytes still needed by "
                                 "targets); writes wait", self.name, needed, j.capacity)
            self.journal_full = True
            self._space.clear()
            self._checkpoint_now.set()
            await self._space.wait()

    async def _checkpointer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._checkpoint_now.wait(), CHECKPOINT_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._checkpoint_now.clear()
            try:
                pos = self.journal.position(self.applied_seq)
                acked = {n: t.acked_seq for n, t in self.targets.items()}
                if pos != self.checkpoint or acked != self._saved_acked:
                    await loop.run_in_executor(None, self._sync_and_save, pos, acked)
                low = min([pos.seq, *acked.values()])
                if low > self.journal.base.seq:
                    self.journal.trim_through(low)
            except (OSError, JournalError) as exc:
                self.log.error("group %s: checkpoint failed: %s", self.name, exc)
            self._space.set()

    def _sync_and_save(self, pos: Position, acked: dict | None = None) -> None:
        """Make the volumes durable through `pos`, then record it (atomic rename)."""
        for vol in self.volumes.values():
            vol.sync()
        acked = acked if acked is not None else {n: t.acked_seq for n, t in self.targets.items()}
        tmp = os.path.join(self.dir, "group.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"checkpoint": [pos.seq, pos.hcrc], "acked": acked}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, "group.json"))
        self.checkpoint = pos
        self._saved_acked = acked

    def _read_state(self) -> dict:
        try:
            with open(os.path.join(self.dir, "group.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise GroupError(f"group {self.name}: cannot read {self.dir}/group.json: {exc}") from None

    # ---- status -------------------------------------------------------------------------
    def lag(self, acked_seq: int) -> tuple[int, int, float]:
        """(records, bytes, seconds) a target at `acked_seq` is behind."""
        last = self.journal.last_seq
        if acked_seq >= last:
            return 0, 0, 0.0
        records = last - acked_seq
        nbytes = self.journal.bytes_between(acked_seq, last)
        oldest = self.journal.time_ns(acked_seq + 1)
        seconds = max(0.0, (time.time_ns() - oldest) / 1e9) if oldest else 0.0
        return records, nbytes, seconds
