"""A consistency group on one node: the write path and its ordering.

Every write to any volume of the group, whether it comes from an NBD client on the
primary or from the upstream node on a replica, goes through one pipeline, all of it
on the event loop thread (only the fdatasync runs elsewhere, a kernel AIO worker):

    submit_write / submit_records   assign or check seq, encode, queue
    _committer, _write              take everything queued as one batch, one writev
                                    into the journal's page cache; the batch is now
                                    written: readable (memtable.py), shipped early to
                                    in-sync sync targets, and its writes complete
                                    (primary: once every in-sync sync target has
                                    written it too; replica: the receiver acks it)
    commit_soon, _synced           one fdatasync for everything written (a group
                                    commit), when a FLUSH or FUA write waits for it, a
                                    shipper waits for records, the memtable grows past
                                    MEMTABLE_COMMIT_BYTES, or commit_interval passed
    _durable                        in seq order: index the batch (shippers read it),
                                    pwrite each record to its volume
    submit_flush                    completes once its writes are durable here and on
                                    every in-sync sync target (they ack durable apart)

This is the durability contract of DESIGN.md (NBD's: a disk with a volatile write
cache). `durability: write` makes each write wait for its commit, like a FLUSH.

Why a volume never holds a write that its journal lost: records reach the volumes
only once durable in the journal (_durable), and reads see the newer ones from the
memtable until then. So after kill -9 or power loss the volumes hold the image after
the checkpoint's seq, every record the journal lost is newer than anything in them,
and recovery replays the journal's durable prefix onto them: the image after some seq
k >= the last flush point (DESIGN.md invariant 1). The other design, writing the volume
at once and resyncing an activity log of regions with non-durable writes after a crash
(DRBD), leaves a primary's own volume a mix that no seq describes, which invariant 1
forbids; its one advantage, no memory for unapplied writes, is bounded here by
MEMTABLE_COMMIT_BYTES.

Checkpoints make the volumes durable (fdatasync) and record the seq they hold in
`group.json`, together with every target's acked (durable) seq; the journal is then
trimmed up to min(checkpoint, acked of every target).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from . import statefile
from .bitmap import Bitmap, BitmapError
from .config import GroupConfig, TargetConfig
from .generations import Generation, from_json, new_generation, to_json
from .journal.record import Kind, RecordError, encode_header, header_crc, iterate
from .journal.flusher import Flusher
from .journal.segments import Journal, JournalError, Position
from .memtable import Memtable
from .undo import UndoError, UndoLog
from .volume import Volume

Done = Callable[[int], None]
CHECKPOINT_INTERVAL = 1.0  # how often the checkpointer looks
SYNC_INTERVAL = 10.0  # seconds the volumes may go without an fdatasync while written
MEMTABLE_COMMIT_BYTES = 32 << 20  # written, not durable: past this, commit at once


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
        else:
            vol.zero(offset, length)


class GroupError(Exception):
    """The group cannot start or cannot accept a batch."""


class TargetLink:
    """What the write path needs to know of one target; its shipper keeps it current."""

    def __init__(self, cfg: TargetConfig, acked_seq: int, bitmap: Bitmap):
        self.node = cfg.node
        self.configure(cfg)
        self.acked_seq = acked_seq  # durable on the target (what the journal may trim)
        self.written_seq = acked_seq  # written to its journal (what sync writes wait for)
        self.in_sync = False  # connected and caught up: sync writes wait for it
        self.bitmap = bitmap  # active: the target is logging (or resyncing) from it
        self.why = ""  # why it went to logging
        self.resync_mode = "full"  # full | checksum | none: how the next resync starts
        self.resync_initial = False  # that resync is the target's initial sync
        self.resync_epoch = 0  # bumped by each resync request: a running pass starts over
        self.synced = acked_seq > 0  # has had its initial sync (or streamed from seq 0)
        self.connected = False
        self.disconnected_at = time.monotonic()
        self.finishing = False  # RESYNC_DONE sent: the bitmap's `through` must stay put
        # Logging: when the oldest write it lacks was journaled (wall clock ns; 0: not
        # known yet), kept because the journal trims that record away (lag_seconds).
        self.lacks_since_ns = 0

    def configure(self, cfg: TargetConfig) -> None:
        """Take this target's (possibly changed) configuration; its position stays."""
        self.cfg = cfg
        self.mode = cfg.mode
        self.block = cfg.on_disconnect == "block"  # writes wait while it is not streaming
        self.bunker = cfg.bunker

    def acked(self, written: int, durable: int) -> None:
        """The target acknowledged: written through `written`, durable through `durable`."""
        self.written_seq = max(self.written_seq, written)
        self.acked_seq = max(self.acked_seq, durable)

    def reset_position(self, seq: int) -> None:
        """The target holds exactly seq (a handshake or a resync said so)."""
        self.written_seq = self.acked_seq = seq

    @property
    def logging(self) -> bool:
        return self.bitmap.active

    @property
    def streaming(self) -> bool:
        """Connected and fed from the journal (not away, not logging, not resyncing)."""
        return self.connected and not self.bitmap.active


class _Batch:
    __slots__ = ("first_seq", "last_seq", "bufs", "nbytes", "sizes", "hcrcs", "applies", "dones",
                 "appended")

    def __init__(self):
        self.first_seq = 0
        self.last_seq = 0
        self.bufs: list = []
        self.nbytes = 0
        self.sizes: list[int] = []
        self.hcrcs: list[int] = []
        self.applies: list = []  # (volume, kind, offset, length, payload)
        self.dones: list = []  # (seq, done)
        self.appended = None  # the journal's handle once written


class Group:
    def __init__(self, cfg: GroupConfig, state_dir: str, log: logging.Logger | None = None):
        self.cfg = cfg
        self.name = cfg.name
        self.role = cfg.role
        self.dir = os.path.join(state_dir, "groups", cfg.name)
        self.log = log or logging.getLogger(f"replicator.group.{cfg.name}")
        self.volumes = {v.name: Volume(v.name, v.path, v.size, v.allocation)
                        for v in cfg.volumes}
        self.journal = Journal(os.path.join(self.dir, "journal"), capacity=cfg.journal_size)
        self.targets: dict[str, TargetLink] = {}
        self.checkpoint = Position(0, 0)
        self.applied_seq = 0
        self.journal_full = False  # writes wait for the journal to be trimmed
        self.journal_no_space = False  # the last journal write failed ENOSPC
        self._next_seq = 1
        self._batch = _Batch()
        # The durability points (DESIGN.md, "The durability contract"): written_seq is
        # in the journal's page cache and readable, durable_seq fdatasync'd (and in the
        # journal's index, and applied to the volumes unless they refuse it), flush_seq
        # the last seq a completed FLUSH or FUA covered.
        self.written_seq = 0
        self.durable_seq = 0
        self.flush_seq = 0
        self.flush_wanted = 0  # the highest seq a flush waits for (sync shippers pass it on)
        self._unsynced: deque[_Batch] = deque()  # written, not durable yet, in seq order
        self._memtable = Memtable()  # what they wrote, for reads until they are applied
        self._syncing = False  # a commit's fdatasyncs are in flight
        self._commit_again = False  # something asked for a commit while one ran
        self._commit_timer: asyncio.TimerHandle | None = None  # commit_interval
        self._sync_waits: deque = deque()  # (seq, done): writes waiting for sync targets
        self._flush_waits: deque = deque()  # (seq, done): flushes waiting for durability
        self.durable_listeners: set[Callable[[int], None]] = set()  # receivers: ack durable
        self._record_waiters: list[asyncio.Future] = []
        self._idle_waiters: list[asyncio.Future] = []
        self._durable_waiters: list[asyncio.Future] = []
        self._flusher: Flusher | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"io-{cfg.name}")
        self._kick = asyncio.Event()
        self._space = asyncio.Event()
        self._checkpoint_now = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._saved_acked: dict = {}
        self._state_changed = False  # group.json misses something besides positions
        self._save_lock = threading.Lock()
        self.logging_after = 5.0  # seconds a target may be away before it goes to logging
        self.resync_base: Position | None = None  # replica: inconsistent since this position
        self.undo = UndoLog(os.path.join(self.dir, "resync.undo"))
        self._resync_done = False
        self._had_image = False  # these volumes held a consistent image of the group once
        # Role, source and targets as the config says, until promote/demote/switchover
        # change them at runtime (kept in group.json until the config agrees again).
        self.source = cfg.source
        self.target_cfgs: list[TargetConfig] = list(cfg.targets)
        self.overridden = False
        self.history: list[Generation] = []  # generations this image descends from
        self.split_brain: dict | None = None  # {peer, fork, ...} while a peer diverged
        self.bunker_far_seq: int | None = None  # bunker: RETAIN from the primary
        self.early_senders: set = set()  # shippers taking batches before their fdatasync
        self.halted: str | None = None  # why writes stopped (a shipped batch failed here)
        self.survivor: str | None = None  # resolve --discard-local: the peer whose line wins
        self.discarded: list[str] = []  # where rolled-back divergent data was saved
        self._held: list | None = None  # writes held during a switchover
        self._unapplied: deque[_Batch] = deque()  # journaled, not yet in the volumes
        self._unapplied_errno = 0
        self.volume_error: str | None = None  # why the volumes lag the journal

    # ---- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        """Open volumes, recover the journal and replay it onto the volumes."""
        os.makedirs(self.dir, exist_ok=True)
        for vol in self.volumes.values():
            vol.open()
        self.journal.open()
        state = self._read_state()
        self.checkpoint = Position(*state.get("checkpoint", (0, 0)))
        self._acked_saved = state.get("acked", {})
        self._modes_saved = state.get("resync_modes", {})
        self._synced_saved = set(state.get("synced", ()))
        self._lacks_saved = state.get("lacks_since_ns", {})
        self.history = from_json(state.get("generations"))
        self.discarded = list(state.get("discarded", []))
        # A state saved before has_image existed is taken to have one (keep protecting).
        self._had_image = bool(state.get("has_image", bool(state)))
        runtime = state.get("runtime")
        if runtime:
            if (runtime["role"], runtime["source"]) == (self.cfg.role, self.cfg.source):
                self.log.info("group %s: the config now says what promote/demote set at "
                              "runtime; the config applies again", self.name)
            else:
                self.role, self.source, self.overridden = runtime["role"], runtime["source"], True
                self.target_cfgs = [TargetConfig(**t) for t in runtime["targets"]]
                self.log.warning("group %s: %s here since a runtime role change (config says "
                                 "%s); targets %s", self.name, self.role, self.cfg.role,
                                 [t.node for t in self.target_cfgs] or "none")
        os.makedirs(os.path.join(self.dir, "bitmaps"), exist_ok=True)
        for t in self.target_cfgs:
            self._add_target(t)
        j = self.journal
        if state.get("resync"):
            self.resync_base = Position(*state["resync"])
            try:
                self.undo.open()
            except UndoError as exc:
                raise GroupError(f"group {self.name}: {exc}") from None
        elif os.path.exists(self.undo.path):
            os.unlink(self.undo.path)  # left by a resync whose completion was recorded
        if self.checkpoint.seq > j.last_seq and "resync_done" in state:
            # A resync completed (checkpoint recorded) but the journal was not rebased yet.
            j.rebase(self.checkpoint)
        if not j.base.seq <= self.checkpoint.seq <= j.last_seq:
            raise GroupError(
                f"group {self.name}: volumes were checkpointed at seq {self.checkpoint.seq} "
                f"but the journal holds {j.first_seq}..{j.last_seq}; the journal under "
                f"{j.directory} is missing records")
        if j.position(self.checkpoint.seq) != self.checkpoint:
            raise GroupError(f"group {self.name}: journal record {self.checkpoint.seq} does "
                             "not match the checkpoint (journal replaced?)")
        try:
            replayed = 0 if self.role == "bunker" else self._replay(self.checkpoint.seq)
        except OSError as exc:
            raise GroupError(f"group {self.name}: cannot replay the journal after seq "
                             f"{self.checkpoint.seq} onto the volumes: {exc}") from None
        self.applied_seq = self.written_seq = self.durable_seq = j.last_seq
        self._next_seq = j.last_seq + 1
        if replayed:
            self.log.info("group %s: replayed %d journal records onto the volumes",
                          self.name, replayed)
            self._sync_and_save(j.position())
        for t in self.targets.values():
            if t.logging:  # rebuild what the journal holds past the saved bitmap
                self.mark_bitmap(t)
                t.bitmap.save()
        if self.role == "primary" and not self.history:
            self.history = [new_generation(j.last_seq + 1)]
            self._sync_and_save(j.position(self.applied_seq))

    def _add_target(self, t: TargetConfig) -> TargetLink:
        sizes = {v.name: v.size for v in self.volumes.values()}
        bitmap = Bitmap(os.path.join(self.dir, "bitmaps", f"{t.node}.bm"), sizes,
                        self.cfg.bitmap_granularity)
        try:
            bitmap.load()
        except BitmapError as exc:
            raise GroupError(f"group {self.name}: {exc}") from None
        link = self.targets[t.node] = TargetLink(t, int(self._acked_saved.get(t.node, 0)), bitmap)
        link.synced = link.synced or t.node in self._synced_saved
        if bitmap.active:
            link.why = "saved bitmap"
            link.lacks_since_ns = int(self._lacks_saved.get(t.node, 0))
            link.resync_mode, link.resync_initial = self._modes_saved.get(t.node, ("full", False))
        return link

    def set_targets(self, targets: list[TargetConfig], member_at: int | None = None) -> None:
        """Ship to these targets from now on (runtime change; the agent starts and stops
        the shippers). A target kept keeps its position and bitmap; one dropped leaves
        them behind for when it comes back. A target never shipped to that is a member
        of our line (`member_at`: the seq our line had when it joined it) is taken to be
        there until it connects and says where it is: it needs no full copy, and a
        position off that is caught by the handshake (checksum resync or rejoin)."""
        self.target_cfgs = list(targets)
        for node in set(self.targets) - {t.node for t in targets}:
            gone = self.targets.pop(node)
            self._acked_saved[node] = gone.acked_seq
            gone.bitmap.save()
        for t in targets:
            if t.node in self.targets:
                self.targets[t.node].configure(t)  # e.g. back to sync after a failback
                continue
            link = self._add_target(t)
            if member_at is not None and not link.synced and not link.logging:
                link.reset_position(member_at)
                link.synced = True
        self.targets_changed()

    async def promote(self, targets: list[TargetConfig] | None, force: bool) -> Generation:
        """This replica becomes the primary: a new generation starts after its last
        record. Refused for an inconsistent (being resynced) or split-brained image
        unless forced."""
        if self.role == "primary":
            raise GroupError(f"group {self.name} is already primary here")
        if self.inconsistent and not force:
            raise GroupError(f"group {self.name} is inconsistent here (a resync was "
                             f"interrupted; last consistent image: seq {self.resync_base.seq}); "
                             "roll it back first (replicator rollback), or force")
        if self.split_brain and not force:
            raise GroupError(f"group {self.name} is in split brain with "
                             f"{self.split_brain['peer']}; resolve it first, or force")
        await self.settle()
        gen = new_generation(self.journal.last_seq + 1)
        self.history.append(gen)
        self.role, self.source, self.overridden = "primary", None, True
        self.resync_base = None
        if targets is not None:
            self.set_targets(targets, member_at=gen.first_seq - 1)
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.applied_seq))
        self.undo.remove()
        self.log.warning("group %s: promoted to primary, generation %s", self.name, gen)
        return gen

    def hold_writes(self) -> None:
        """Switchover: new writes wait (uncompleted) until release_writes()."""
        self._held = []

    def release_writes(self) -> None:
        """Queue the held writes: written if this node is still primary, else refused."""
        held, self._held = self._held or [], None
        for item in held:
            self._queue_local(*item)

    async def demote(self, source: str) -> None:
        """The primary becomes a secondary of `source`: writes are refused from now on,
        and it ships to nobody (the new primary does)."""
        if self.role != "primary":
            raise GroupError(f"group {self.name} is not primary here")
        self.role, self.source, self.overridden = "secondary", source, True
        self.set_targets([])
        await self.settle()
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.applied_seq))
        self.log.warning("group %s: demoted to secondary of %s", self.name, source)

    async def restore(self) -> bool:
        """Back to the configured source and targets (after a failover and failback put
        the primary role back where the config has it). Only when the role agrees."""
        if self.role != self.cfg.role:
            raise GroupError(f"group {self.name} is {self.role} here but the config says "
                             f"{self.cfg.role}: fail back (or switch over) first, or update the "
                             "config")
        if not self.overridden:
            return False
        self.source, self.overridden = self.cfg.source, False
        self.set_targets(list(self.cfg.targets))
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.applied_seq))
        self.log.warning("group %s: back to the configured topology (source %s, targets %s)",
                         self.name, self.source, [t.node for t in self.target_cfgs] or "none")
        return True

    async def reparent(self, source: str) -> None:
        """Take records from `source` from now on (its parent was lost): it must be of
        our line; the position decides whether it streams or resyncs by checksum. A target
        that becomes the source stops being one (a node never feeds its own source)."""
        if self.role == "primary":
            raise GroupError(f"group {self.name} is primary here: it has no source")
        self.source, self.overridden = source, True
        if source in self.targets:  # a failover reversed the link: we no longer feed it
            self.set_targets([t for t in self.target_cfgs if t.node != source])
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.applied_seq))
        self.log.warning("group %s: re-parented: source is now %s", self.name, source)

    def adopt(self, history: list[Generation], source: str) -> None:
        """A sender whose line this image descends from (or is rolled back onto) is now
        its source: take its history (saved at the next checkpoint)."""
        if history != self.history or source != self.source:
            if source != self.source:
                self.log.warning("group %s: source is now %s (was %s)", self.name, source,
                                 self.source)
                self.overridden = True
            self.history, self.source = list(history), source
            self.split_brain = None  # now of the sender's line: what diverged is rolled back
            self._state_changed = True
            self._checkpoint_now.set()

    def save_diverged(self, fork: int, extents: list[tuple[str, int, int]] | None) -> str:
        """Before a resync rolls back this node's records after `fork`, keep what they
        wrote: the content of `extents` (or, when they are not all known, a copy of every
        volume) under the group's state directory. Returns the path."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        base = os.path.join(self.dir, f"diverged-{fork}-{stamp}")
        os.makedirs(base, exist_ok=True)
        if extents is None:
            for vol in self.volumes.values():
                copy = os.path.join(base, f"{vol.name}.img")
                shutil.copyfile(vol.path, copy)
                with open(copy, "rb") as f:
                    os.fsync(f.fileno())
            index = {"fork": fork, "complete": False, "volumes": sorted(self.volumes)}
        else:
            with open(os.path.join(base, "regions.bin"), "wb") as f:
                for volume, offset, length in extents:
                    f.write(self.volumes[volume].read(offset, length))
                f.flush()
                os.fsync(f.fileno())  # durable before the resync overwrites the regions
            index = {"fork": fork, "complete": True,
                     "regions": [{"volume": v, "offset": o, "length": n} for v, o, n in extents]}
        with open(os.path.join(base, "index.json"), "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for d in (base, self.dir):  # the new names too
            statefile.fsync_dir(d)
        self.discarded.append(base)
        self._state_changed = True
        self.log.warning("group %s: data written here after seq %d is rolled back; kept in %s",
                         self.name, fork, base)
        return base

    def diverged_extents(self, fork: int) -> tuple[bool, list[tuple[str, int, int]]]:
        """The regions written by this node's records after `fork`: (complete, extents);
        not complete when the journal no longer holds all of them."""
        j = self.journal
        complete = fork + 1 >= j.first_seq
        extents = []
        seq = max(fork + 1, j.first_seq)
        while seq <= j.last_seq:
            _, last, data = j.read(seq, 8 << 20)
            extents += [(r.volume, r.offset, r.length) for r in iterate(data)]
            seq = last + 1
        return complete, extents

    def _replay(self, after_seq: int) -> int:
        seq, count = after_seq + 1, 0
        while seq <= self.journal.last_seq:
            first, last, data = self.journal.read(seq, 8 << 20)
            applies = [(self.volumes[r.volume], r.kind, r.offset, r.length, r.payload)
                       for r in iterate(data)]
            apply_to_volumes(applies)
            count += last - first + 1
            seq = last + 1
        return count

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._flusher = Flusher(loop, log=self.log)
        self._tasks = [loop.create_task(self._guarded(self._committer(), "committer"),
                                        name=f"commit-{self.name}"),
                       loop.create_task(self._guarded(self._checkpointer(), "checkpointer"),
                                        name=f"checkpoint-{self.name}")]

    async def _guarded(self, loop_coro, what: str) -> None:
        """Run one of the group's long-running loops; should it ever raise, the group
        fails loudly (status, log, every write answered with EIO), never a hang."""
        try:
            await loop_coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - anything: the group must say so
            self.log.exception("group %s: the %s failed", self.name, what)
            self._halt(f"the {what} failed ({type(exc).__name__}: {exc}): no more writes "
                       "until the agent restarts")

    def _halt(self, why: str) -> None:
        """Stop accepting writes for good (until a restart), failing what waits."""
        if self.halted is None:
            self.halted = why
            self.log.error("group %s: %s", self.name, why)
        self._fail_pending(errno.EIO)
        for waits in (self._sync_waits, self._flush_waits):
            while waits:
                waits.popleft()[1](errno.EIO)
        wake_all(self._idle_waiters)
        wake_all(self._durable_waiters)
        wake_all(self._record_waiters)

    async def stop(self) -> None:
        """Finish what is queued, make it durable, checkpoint, close files."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._batch.dones:
            self._fail_pending(errno.ESHUTDOWN)
        await self.settle()  # what is written becomes durable and applied
        while self._syncing:  # a failed group still waits for its fdatasync in flight
            await self._wait(self._durable_waiters)
        self._flusher.close()
        for waits in (self._sync_waits, self._flush_waits):
            while waits:
                waits.popleft()[1](errno.ESHUTDOWN)
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.applied_seq))
        self._io.shutdown()
        self.journal.close()
        for vol in self.volumes.values():
            vol.close()

    # ---- the write path (loop thread) ------------------------------------------------
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
        if seq <= self.durable_seq and seq <= self.durable_floor():
            self.flush_seq = max(self.flush_seq, seq)
            done(0)
            return
        self._flush_waits.append((seq, done))
        self.flush_wanted = max(self.flush_wanted, seq)
        self.commit_soon()
        wake_all(self._record_waiters)  # sync shippers pass the flush on

    def read(self, volume: Volume, offset: int, length: int) -> bytes:
        """What a client reads: the volume, with completed writes not applied yet."""
        return self._memtable.overlay(volume.name, offset, volume.read(offset, length))

    def _queue_local(self, volume, kind, offset, length, payload, done) -> None:
        if self._held is not None:
            self._held.append((volume, kind, offset, length, payload, done))
            return
        if self.role != "primary":
            done(errno.EROFS)
            return
        if self.halted:
            done(errno.EIO)
            return
        if self._unapplied:  # the volumes lack journaled records: see _applied
            done(self._unapplied_errno)
            return
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
        """Replica: journal and apply records received from upstream, as they are;
        done(0) once written to the journal (durable_listeners hear when they are
        durable). Records we already hold are skipped (a resent batch); a gap or a
        record that does not fit this group raises GroupError and nothing is queued."""
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
                sizes.append(rec.size)
                hcrcs.append(rec.hcrc)
                if self.role == "bunker":  # journal only
                    continue
                vol = self.volumes.get(rec.volume)
                if vol is None or rec.offset + rec.length > vol.size:
                    raise GroupError(f"record {rec.seq} targets {rec.volume!r} "
                                     f"[{rec.offset}, +{rec.length}) which group "
                                     f"{self.name} does not have")
                applies.append((vol, rec.kind, rec.offset, rec.length, rec.payload))
        except RecordError as exc:
            raise GroupError(f"group {self.name}: corrupt record in batch "
                             f"{first_seq}..{last_seq}: {exc}") from None
        if seq - 1 != last_seq:
            raise GroupError(f"batch claims {first_seq}..{last_seq} but holds "
                             f"{first_seq}..{seq - 1}")
        if not sizes:
            done(0)
            return
        if self.halted:
            done(errno.EIO)
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
        if self.role != "bunker":
            self._memtable.add(batch.last_seq, (
                (seq, vol.name, offset, length, payload if kind == Kind.WRITE else None)
                for seq, (vol, kind, offset, length, payload)
                in zip(range(batch.first_seq, batch.last_seq + 1), batch.applies)))
        if self.early_senders:  # in the page cache now: ship while it is not durable yet
            self._send_early(batch)
        if self.role != "primary":
            for _, done in batch.dones:  # written: the receiver acks it
                done(0)
        elif self.cfg.durability == "write":
            self._flush_waits.extend(batch.dones)
            self.flush_wanted = max(self.flush_wanted, batch.last_seq)
        else:
            floor = self.written_floor()
            for seq, done in batch.dones:
                if seq <= floor:
                    done(0)
                else:
                    self._sync_waits.append((seq, done))
        batch.dones = []
        if self._flush_waits or self._memtable.nbytes > MEMTABLE_COMMIT_BYTES or \
                self._record_waiters or self._idle_waiters:
            self.commit_soon()
        elif self._commit_timer is None:
            self._commit_timer = asyncio.get_running_loop().call_later(
                self.cfg.commit_interval, self._commit_due)

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
        self.journal.sync([b.appended for b in self._unsynced], self._flusher.fdatasync,
                          lambda err: self._synced(through, err))

    def _synced(self, through: int, err: int) -> None:
        """Loop: the commit through `through` ended (its fdatasyncs)."""
        self._syncing = False
        if err:
            # Records that completed may be lost: nobody may build on them (a restart
            # recovers what the journal really holds).
            self._halt(f"the journal's fdatasync failed ({os.strerror(err)}) "
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
        if not self._unapplied:
            try:
                apply_to_volumes(batch.applies)
            except OSError as exc:
                self._volume_failed(batch, exc)
                return
            self.applied_seq = batch.last_seq
        else:
            self._unapplied.append(batch)

    def _release_flushes(self) -> None:
        """Complete the flushes (and durability: write writes) now durable everywhere
        they must be: here and on every in-sync sync target."""
        waits = self._flush_waits
        floor = min(self.durable_seq, self.durable_floor())
        while waits and waits[0][0] <= floor:
            seq, done = waits.popleft()
            self.flush_seq = max(self.flush_seq, seq)
            done(0)

    def _volume_failed(self, batch: _Batch, exc: OSError) -> None:
        self._unapplied.append(batch)
        self._unapplied_errno = exc.errno or errno.EIO
        until = ("writes are refused until the volumes take every journaled record"
                 if self.role == "primary" else "records are journaled, not applied, until "
                 "the volumes take them")
        self.volume_error = (f"a volume write failed after seq {batch.first_seq}..{batch.last_seq} "
                             f"was journaled ({exc}); {until} (retried every second)")
        self.log.error("group %s: %s", self.name, self.volume_error)

    def _retry_applies(self) -> None:
        """Checkpointer (loop): apply the journaled batches the volumes refused, in order."""
        while self._unapplied:
            batch = self._unapplied[0]
            try:
                apply_to_volumes(batch.applies)
            except OSError as exc:
                self.log.debug("group %s: volume write of seq %d..%d still fails: %s",
                               self.name, batch.first_seq, batch.last_seq, exc)
                return
            self._unapplied.popleft()
            self.applied_seq = batch.last_seq
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

    # ---- replica side of a resync -------------------------------------------------------
    @property
    def has_image(self) -> bool:
        """The volumes hold, or held before a resync began, an image of the group after
        some seq: a primary's, or a replica's once it applied a record or finished a
        resync. A new target's initial sync has none, so it keeps no undo log."""
        return self._had_image or self.role == "primary" or self.journal.last_seq > 0

    @property
    def inconsistent(self) -> bool:
        """A resync is overwriting regions out of order: not a prefix image until done."""
        return self.resync_base is not None

    async def apply_resync(self, items: list[tuple[str, int, bytes]]) -> None:
        """Write resync regions (volume, offset, data) durably, saving what they
        overwrite in the undo log first. Downstream targets get the regions marked."""
        for volume, offset, data in items:
            vol = self.volumes.get(volume)
            if vol is None or offset + len(data) > vol.size:
                raise GroupError(f"resync region {volume!r} [{offset}, +{len(data)}) is not "
                                 f"in group {self.name}")
        loop = asyncio.get_running_loop()
        if self.resync_base is None:
            await self.settle()
            self.resync_base = self.journal.position()
            await loop.run_in_executor(self._io, self.undo.open)
            await loop.run_in_executor(self._io, self._sync_and_save, self.checkpoint)
            if self.has_image:
                self.log.warning("group %s: resync started; inconsistent until it completes "
                                 "(last consistent image: seq %d)", self.name,
                                 self.resync_base.seq)
            else:
                self.log.warning("group %s: initial sync started: these volumes held no image "
                                 "of the group, so none is kept (no undo log)", self.name)
        for t in self.targets.values():
            if not t.logging:
                self.start_logging(t, "this replica is being resynced")
        await loop.run_in_executor(self._io, self._resync_io, items)
        # Marked once written (a downstream pass that read the old content then resends
        # it) and saved before the upstream hears the regions are durable here.
        for t in self.targets.values():
            for volume, offset, data in items:
                t.bitmap.mark(volume, offset, len(data))
        if self.targets:
            await loop.run_in_executor(self._io, self._save_bitmaps)

    def _save_bitmaps(self) -> None:
        for t in list(self.targets.values()):
            t.bitmap.save()

    def _resync_io(self, items) -> None:
        if self.has_image:
            self.undo.save([(v, o, self.volumes[v].read(o, len(d))) for v, o, d in items])
        touched = set()
        for volume, offset, data in items:
            self.volumes[volume].write(offset, data)
            touched.add(volume)
        for volume in touched:
            self.volumes[volume].sync()

    async def finish_resync(self, pos: Position) -> None:
        """The sender says we now hold its image after `pos`: record it, restart the
        journal there, forget the undo log."""
        loop = asyncio.get_running_loop()
        await self.settle()
        self.resync_base = None
        self._resync_done = True
        self._had_image = True
        await loop.run_in_executor(self._io, self._sync_and_save, pos)
        self.journal.rebase(pos)
        self._resync_done = False
        self.undo.remove()
        for vol in self.volumes.values():
            vol.forget()  # what the resync read and wrote
        self.applied_seq = self.written_seq = self.durable_seq = pos.seq
        self._unapplied.clear()  # the resync wrote the image they belong to
        self.volume_error = None
        self._next_seq = pos.seq + 1
        for t in self.targets.values():
            if t.logging:
                t.bitmap.through = pos.seq
                t.bitmap.save()
        self.log.info("group %s: resync complete at seq %d; consistent again", self.name, pos.seq)

    async def rollback(self) -> int:
        """Undo an unfinished resync: put back every region it overwrote, so the
        volumes hold the last consistent image again. Returns the regions restored."""
        if self.resync_base is None:
            raise GroupError(f"group {self.name} is not being resynced: nothing to roll back")
        if not self.has_image:
            raise GroupError(f"group {self.name} is in its initial sync here: these volumes "
                             "never held an image of the group, there is none to roll back to")
        loop = asyncio.get_running_loop()
        restored = await loop.run_in_executor(self._io, self._resync_io_rollback)
        base = self.resync_base
        self.resync_base = None
        await loop.run_in_executor(self._io, self._sync_and_save, self.checkpoint)
        self.undo.remove()
        self.log.warning("group %s: resync rolled back (%d regions restored); consistent "
                         "at seq %d", self.name, restored, base.seq)
        return restored

    def _resync_io_rollback(self) -> int:
        restored = 0
        for volume, offset, old in self.undo.entries_newest_first():
            self.volumes[volume].write(offset, old)
            restored += 1
        for vol in self.volumes.values():
            vol.sync()
        return restored

    # ---- sync targets ------------------------------------------------------------------
    def _holding(self):
        """The targets writes wait for: the in-sync sync targets, a connected bunker even
        while it catches up (its copy of the journal is what makes a takeover lossless),
        and targets with on_disconnect: block that are not streaming (their position then
        holds every later write back)."""
        return (t for t in self.targets.values()
                if (t.mode == "sync" and (t.in_sync or (t.bunker and t.streaming)))
                or (t.block and not t.streaming))

    def written_floor(self) -> float:
        """Highest seq every target a write waits for has written (inf when none)."""
        return min((t.written_seq for t in self._holding()), default=float("inf"))

    def durable_floor(self) -> float:
        """Highest seq every target a flush waits for has made durable (inf when none)."""
        return min((t.acked_seq for t in self._holding()), default=float("inf"))

    @property
    def blocked_by(self) -> list[str]:
        """Targets with on_disconnect: block that hold writes back right now."""
        return [t.node for t in self.targets.values() if t.block and not t.streaming]

    def targets_changed(self) -> None:
        """A target acked or changed state: release sync writes now covered, and let
        a waiting committer retry trimming."""
        floor = self.written_floor()
        waits = self._sync_waits
        while waits and waits[0][0] <= floor:
            waits.popleft()[1](0)
        self._release_flushes()
        if self.journal_full:
            self._checkpoint_now.set()

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

    # ---- readers: shippers ---------------------------------------------------------------
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

    # ---- space, checkpoints, trimming -------------------------------------------------
    def _needed_after(self) -> int:
        """Records after this seq must stay in the journal: not yet in the volumes'
        checkpoint, not acked by a streaming target, not marked in a logging target's
        saved bitmap. A bunker keeps what the far replicas lack (a takeover replays it
        from there), within logging_high_water bytes."""
        if self.role == "bunker":  # journal only; a restart still checks its checkpoint
            return min(self._bunker_needed_after(), self.checkpoint.seq)
        low = self.checkpoint.seq
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
        if self.role != "bunker":
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

    # ---- logging: dirty-region bitmaps -------------------------------------------------
    def mark_bitmap(self, t: TargetLink) -> None:
        """Mark the journal records after the bitmap's `through` into it."""
        bm, j = t.bitmap, self.journal
        seq = bm.through + 1
        if seq < j.first_seq:
            self.log.warning("group %s: records %d..%d for %s are no longer in the journal; "
                             "every region is checked by checksum", self.name, seq,
                             j.first_seq - 1, t.node)
            bm.set_all()
            t.resync_mode = "checksum"  # its image is ours at some seq: most regions agree
            seq = j.first_seq
        while seq <= j.last_seq:
            _, last, data = j.read(seq, 8 << 20)
            for rec in iterate(data):
                bm.mark(rec.volume, rec.offset, rec.length)
            seq = last + 1
        bm.through = j.last_seq

    def start_logging(self, t: TargetLink, why: str) -> None:
        """The journal stops keeping records for `t`; its bitmap records what changed."""
        t.bitmap.through = t.acked_seq
        t.bitmap.active = True
        t.why = why
        t.resync_mode, t.resync_initial = "full", False
        self._note_lacks_since(t)
        self.mark_bitmap(t)
        t.bitmap.save()
        self.log.warning("group %s: target %s switches to logging (%s); %d regions dirty",
                         self.name, t.node, why, t.bitmap.count())
        self._checkpoint_now.set()

    def request_resync(self, t: TargetLink, mode: str, why: str, initial: bool = False) -> None:
        """Resync `t` from the image as it is now: `full` sends every region,
        `checksum` every region whose hash differs on the target, `clean` none (the
        operator declares the target identical; writes from now on are still sent)."""
        bm = t.bitmap
        if t.bunker:
            mode = "clean"  # a bunker holds no volumes: it restarts from our position
        bm.clear_all() if mode == "clean" else bm.set_all()
        self._note_lacks_since(t)
        bm.through = self.journal.last_seq
        bm.active = True
        t.why = why
        t.resync_mode = "none" if mode == "clean" else mode
        t.resync_initial = initial
        t.resync_epoch += 1
        bm.save()
        self._state_changed = True  # record the mode in group.json
        self._checkpoint_now.set()
        self.log.warning("group %s: %s resync of %s (%s)", self.name,
                         "no-data" if mode == "clean" else mode, t.node, why)

    def request_rejoin(self, t: TargetLink, fork: int,
                       extents: list[tuple[str, int, int]] | None) -> None:
        """`t` diverged after `fork`: resync what our records after the fork wrote and
        what its own records wrote (`extents`; None: unknown, so every region is checked
        by checksum). Only what changed on either side moves, never a full copy."""
        j, bm = self.journal, t.bitmap
        bm.clear_all()
        self._note_lacks_since(t)
        known = extents is not None and fork + 1 >= j.first_seq
        if known:
            bm.through = fork
            self.mark_bitmap(t)
            for volume, offset, length in extents:
                if volume in self.volumes:
                    bm.mark(volume, offset, length)
        else:
            bm.set_all()
            bm.through = j.last_seq
        bm.active = True
        t.why = f"rejoin after the fork at seq {fork}"
        t.resync_mode, t.resync_initial = ("full" if known else "checksum"), False
        t.resync_epoch += 1
        t.synced = True
        bm.save()
        self._state_changed = True
        self._checkpoint_now.set()
        self.log.warning("group %s: %s diverged after seq %d: resync of %s", self.name, t.node,
                         fork, f"{bm.count()} region(s)" if known else "every region by checksum")

    def mark_for_repair(self, t: TargetLink, regions: list[tuple[str, int, int]]) -> None:
        """Verify found `regions` (volume, offset, length) different on `t`: resync them
        (with whatever else `t` has not acknowledged yet)."""
        if not t.logging:
            self.start_logging(t, f"verify --repair of {len(regions)} region(s)")
        for volume, offset, length in regions:
            t.bitmap.mark(volume, offset, length)
        t.bitmap.save()

    def stop_logging(self, t: TargetLink, seq: int) -> None:
        """`t` holds our image after `seq`: back to shipping journal records from seq + 1."""
        bm = t.bitmap
        bm.clear_all()
        bm.active, bm.through, bm.remarked = False, seq, None
        t.reset_position(seq)
        t.lacks_since_ns = 0  # the journal holds what it lacks from now on
        t.finishing = False
        t.synced = True
        bm.save()
        self._state_changed = True
        self.targets_changed()

    def _update_logging(self) -> None:
        """Checkpointer: switch away or far-behind targets to logging; keep the bitmaps
        of logging targets marked through the end of the journal and saved."""
        now = time.monotonic()
        j = self.journal
        for t in self.targets.values():
            if t.logging:
                self._note_lacks_since(t)  # before the trim below lets the record go
                if not t.finishing and t.bitmap.through < j.last_seq:
                    self.mark_bitmap(t)
                    t.bitmap.save()
            elif not t.connected and now - t.disconnected_at >= self.logging_after:
                if t.acked_seq < j.last_seq:
                    self.start_logging(t, f"unreachable for {now - t.disconnected_at:.0f}s")
            elif self.journal_full and not t.block and t.acked_seq < j.last_seq:
                self.start_logging(t, "the journal is full")  # writes wait for room
            elif j.bytes_between(t.acked_seq, j.last_seq) > self.cfg.logging_high_water:
                self.start_logging(t, "behind by more than logging_high_water")

    def _note_lacks_since(self, t: TargetLink) -> None:
        """Remember when the oldest write `t` lacks was journaled, while the journal
        still holds it (a logging target's records are trimmed away)."""
        if not t.lacks_since_ns and t.acked_seq < self.journal.last_seq:
            t.lacks_since_ns = self.journal.time_ns(t.acked_seq + 1) or time.time_ns()

    def _could_free(self) -> bool:
        """A checkpoint, a trim or switching targets to logging (what the checkpointer
        does while the journal is full) would free the journal's oldest segment; an
        on_disconnect: block target is never switched: writes wait for it."""
        oldest = self.journal.oldest_segment_last_seq()
        if oldest is None:
            return False
        if self.role == "bunker":
            return self._needed_after() >= oldest
        low = self.applied_seq
        for t in self.targets.values():
            if t.logging:  # its bitmap is marked through the end, unless a resync finishes
                low = min(low, t.bitmap.through if t.finishing else self.journal.last_seq)
            elif t.block:
                low = min(low, t.acked_seq)
        return low >= oldest

    async def _wait_for_space(self, nbytes: int) -> None:
        """The journal is full (writes wait, status says `full`) while the records its
        targets and the checkpoint need do not leave room for `nbytes`, or its reserved
        segments are used up (records rarely fill a segment to the byte) and trimming
        can free one. Meanwhile the checkpointer switches the targets that hold it to
        logging (see _update_logging)."""
        j = self.journal
        while True:
            needed = j.bytes_between(self._needed_after(), j.last_seq)
            if (needed == 0 or needed + nbytes <= j.capacity) and (
                    j.has_room(nbytes) or not self._could_free()):
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
        """Looks every CHECKPOINT_INTERVAL (or when asked) whether a checkpoint is due:
        state changed, or the volumes have not been made durable for SYNC_INTERVAL, or
        more than a quarter of the journal would be replayed after a crash, or the
        journal is more than half full (then every CHECKPOINT_INTERVAL, so trimming
        keeps pace instead of writes waiting for one large volume sync when it is
        full). Syncing the volumes more often only competes with the journal's own
        fdatasyncs for the disk (the journal already holds every write durably)."""
        loop = asyncio.get_running_loop()
        synced_at = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._checkpoint_now.wait(), CHECKPOINT_INTERVAL)
                asked = True
            except asyncio.TimeoutError:
                asked = False
            self._checkpoint_now.clear()
            try:
                if self._unapplied:
                    self._retry_applies()
                self._update_logging()
                pos = self.journal.position(self.applied_seq)
                acked = {n: t.acked_seq for n, t in self.targets.items()}
                changed = pos != self.checkpoint or acked != self._saved_acked
                j = self.journal
                due = (asked or self._state_changed
                       or time.monotonic() - synced_at >= SYNC_INTERVAL
                       or j.bytes_between(self.checkpoint.seq, pos.seq) > j.capacity // 4
                       or j.used_bytes > j.capacity // 2)  # trim as it fills, not when full
                if self._state_changed or (changed and due):
                    await loop.run_in_executor(None, self._sync_and_save, pos, acked)
                    synced_at = time.monotonic()
                low = self._needed_after()
                if low > self.journal.base.seq:
                    gone = self.journal.trim_through(low)
                    if gone:
                        await loop.run_in_executor(None, self.journal.delete, gone)
            except (OSError, JournalError) as exc:
                self.log.error("group %s: checkpoint failed: %s", self.name, exc)
            self._space.set()

    def _sync_and_save(self, pos: Position, acked: dict | None = None) -> None:
        """Make the volumes durable through `pos`, then record it (atomic rename). Runs
        in the checkpointer's thread and in the io worker: one at a time."""
        with self._save_lock:
            self._save(pos, acked)

    def _save(self, pos: Position, acked: dict | None) -> None:
        for vol in self.volumes.values():
            vol.sync()
        acked = acked if acked is not None else {n: t.acked_seq for n, t in self.targets.items()}
        self._state_changed = False  # before the state is read: a later change saves again
        state = {"checkpoint": [pos.seq, pos.hcrc], "acked": {**self._acked_saved, **acked},
                 "generations": to_json(self.history), "discarded": self.discarded,
                 "has_image": self.has_image,
                 "resync_modes": {n: [t.resync_mode, t.resync_initial]
                                  for n, t in self.targets.items() if t.logging},
                 "synced": sorted(n for n, t in self.targets.items() if t.synced),
                 "lacks_since_ns": {n: t.lacks_since_ns for n, t in self.targets.items()
                                    if t.logging and t.lacks_since_ns}}
        if self.overridden:
            state["runtime"] = {"role": self.role, "source": self.source,
                                "targets": [vars(t) for t in self.target_cfgs]}
        if self.resync_base is not None:
            state["resync"] = [self.resync_base.seq, self.resync_base.hcrc]
        elif self._resync_done:
            state["resync_done"] = True  # the journal may still need rebasing to `checkpoint`
        statefile.replace(os.path.join(self.dir, "group.json"), json.dumps(state).encode(),
                          pad=True)  # no fresh space needed: a full disk still checkpoints
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
    def lag(self, t: TargetLink) -> tuple[int, int, float]:
        """(records, bytes, seconds) target `t` is behind: the seconds are the age of
        the oldest write it lacks, whether the journal still holds it or (logging) not;
        the bytes count only what the journal holds. What it has written counts (durable
        there follows within its commit_interval; the journal keeps it until then)."""
        last, acked = self.journal.last_seq, min(t.written_seq, self.journal.last_seq)
        if acked >= last:
            return 0, 0, 0.0
        nbytes = self.journal.bytes_between(acked, last)
        oldest = self.journal.time_ns(acked + 1) or (t.lacks_since_ns if t.logging else 0)
        seconds = max(0.0, (time.time_ns() - oldest) / 1e9) if oldest else 0.0
        return last - acked, nbytes, seconds
