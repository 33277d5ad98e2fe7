"""A consistency group on one node: the parts composed, and what acts on the whole
group (see the package docstring for the parts).

Group owns the volumes and the journal and composes the commit pipeline (commit.py)
and the target links (links.py). It holds what changes a node's place in the group:
its role and source (promote, demote, switchover, restore, reparent), the replica side
of a resync (undo log, RESYNC_DATA applied out of order, finish or roll back), the
logging state of targets (dirty-region bitmaps), retention (what the journal must keep
for its targets, a bunker's ring, waiting for room) and the checkpoint.

Checkpoints make the volumes durable (fdatasync) and record the seq they hold in
`group.json`, together with every target's acked (durable) seq; the journal is then
trimmed up to min(checkpoint, acked of every target). Recovery (open) replays the
journal past the checkpoint onto the volumes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ..bitmap import Bitmap, BitmapError
from ..config import NAME_RE, GroupConfig, TargetConfig
from ..events import emit
from ..generations import Generation
from ..journal.record import CHANGING, FLAG_OPEN, Kind, iterate
from ..journal.segments import Journal, JournalError, Position
from ..undo import UndoError, UndoLog
from ..volume import Volume
from .checkpoint import Checkpoint
from ..analytics import Analytics
from .commit import Commit, GroupError, apply_to_volumes, volume_of
from .guard import LagGuard
from .lineage import Lineage
from .markers import Marker, Markers
from .links import Links, TargetLink
from .retention import Retention
from .window import Point, Window

CHECKPOINT_INTERVAL = 1.0  # how often the checkpointer looks
SYNC_INTERVAL = 10.0  # seconds the volumes may go without an fdatasync while written


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
        self.targets = Links()
        self._checkpoint_now = asyncio.Event()
        self.checkpoint = Checkpoint(cfg.name, self.dir)
        self.retention = Retention(cfg, self.journal, self.targets, self.log,
                                   role=lambda: self.role,
                                   checkpoint_seq=lambda: self.checkpoint.position.seq,
                                   applied_seq=lambda: self.commit.applied_seq,
                                   ask_checkpoint=self._checkpoint_now.set,
                                   keep_after=lambda: self.window.keep_after())
        self.commit = Commit(cfg, self.journal, self.volumes, self.targets, self.log,
                             role=lambda: self.role, wait_for_space=self.retention.wait_for_space)
        # What a replica learns from the records it receives (analytics.py): fed by the
        # commit path as it takes them, reported upstream (report.py).
        self.guard = LagGuard(self)  # max_lag_seconds / max_lag_bytes (guard.py)
        self.analytics = Analytics(sizes={v.name: v.size for v in self.volumes.values()})
        self.commit.observe = self.analytics.observe
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"io-{cfg.name}")
        self._tasks: list[asyncio.Task] = []
        self.logging_after = 5.0  # seconds a target may be away before it goes to logging
        self.resync_base: Position | None = None  # replica: inconsistent since this position
        self.undo = UndoLog(os.path.join(self.dir, "resync.undo"))
        self._resync_done = False
        # The agent did not stop cleanly last time (kill -9 or power loss): the journal
        # may have lost records it had shipped, so a target may hold more than we do.
        self.unclean_start = False
        self._stopped_cleanly = False  # stop() says so in its last checkpoint
        self._had_image = False  # these volumes held a consistent image of the group once
        # Role, source and targets as the config says, until promote/demote/switchover
        # change them at runtime (kept in group.json until the config agrees again).
        self.source = cfg.source
        self.target_cfgs: list[TargetConfig] = list(cfg.targets)
        self.overridden = False
        self.lineage = Lineage(cfg.name, self.dir, self.journal, self.volumes, self.log,
                               changed=self._lineage_changed)
        self.markers = Markers(cfg.name, changed=self._lineage_changed)
        self.commit.marked = self.markers.took
        self.window = Window(self)  # retain / apply_delay on a secondary (window.py)

    # ---- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        """Open volumes, recover the journal and replay it onto the volumes."""
        os.makedirs(self.dir, exist_ok=True)
        self.journal.open()
        state = self.checkpoint.read()
        self.unclean_start = bool(state) and not state.get("clean", True)
        self._acked_saved = state.get("acked", {})
        self._modes_saved = state.get("resync_modes", {})
        self._synced_saved = set(state.get("synced", ()))
        self._lacks_saved = state.get("lacks_since_ns", {})
        self.lineage.load(state)
        self.markers.load(state)
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
        for vol in self.volumes.values():  # after the role: a watched primary's is not opened
            vol.open()
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
        cp = self.checkpoint.position
        if cp.seq > j.last_seq and "resync_done" in state:
            # A resync completed (checkpoint recorded) but the journal was not rebased yet.
            j.rebase(cp)
        if not j.base.seq <= cp.seq <= j.last_seq:
            raise GroupError(
                f"group {self.name}: volumes were checkpointed at seq {cp.seq} "
                f"but the journal holds {j.first_seq}..{j.last_seq}; the journal under "
                f"{j.directory} is missing records")
        if j.position(cp.seq) != cp:
            raise GroupError(f"group {self.name}: journal record {cp.seq} does "
                             "not match the checkpoint (journal replaced?)")
        mark, rewind = self.window.open()  # a deferred secondary's volumes stop at mark
        try:
            replayed, consistent, open_tail = (0, j.last_seq, []) if self.role == "bunker" \
                else self._replay(cp.seq, apply=not self.watched, through=mark)
        except OSError as exc:
            raise GroupError(f"group {self.name}: cannot replay the journal after seq "
                             f"{cp.seq} onto the volumes: {exc}") from None
        if self.window.wanted():
            applied = consistent if mark is None else max(cp.seq, min(mark, consistent))
            self.commit.reset(j.last_seq, consistent, (), applied=applied)
            if rewind:
                self.commit.applied_through(self.window.recover_rewind(rewind))
            self.window.activate(self.commit.applied_seq, fresh=mark is None)
        else:
            self.commit.reset(j.last_seq, consistent, open_tail)
        self.markers.cut(j.last_seq)  # (noted once written: a crash may have lost them)
        for rec in j.records(cp.seq):  # noted after the checkpoint saved the list
            if rec.kind is Kind.MARKER:
                self.markers.took(rec.seq, rec.volume, rec.time_ns, rec.offset == 1)
        if consistent < j.last_seq:
            self.log.warning("group %s: records %d..%d are an epoch that does not close "
                             "yet: %s", self.name, consistent + 1, j.last_seq,
                             "the next epoch closes it" if self.watched else
                             "applied once the rest of it arrives")
        if replayed:
            self.log.info("group %s: replayed %d journal records onto the volumes",
                          self.name, replayed)
            self._sync_and_save(j.position(self.commit.applied_seq))
        for t in self.targets.values():
            if t.logging:  # rebuild what the journal holds past the saved bitmap
                self.mark_bitmap(t)
                t.bitmap.save()
        if self.role == "primary" and not self.lineage.history:
            self.lineage.begin(j.last_seq + 1)
        # Running now: until stop() says otherwise, group.json says "not stopped cleanly".
        self._sync_and_save(j.position(self.commit.applied_seq))

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
            mode, link.resync_initial = self._modes_saved.get(t.node, ("full", False))
            link.resync_mode = "assume-clean" if mode == "none" else mode  # an older name
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
        self.guard.limits_changed()
        self.targets_changed()

    def reconfigure(self, cfg: GroupConfig) -> None:
        """Take a reloaded config of this group whose changes are all live (reload.py
        decides which): its tunables from now on, and its targets unless a runtime role
        change (promote, demote, attach...) holds them until the config agrees again."""
        if cfg.name != self.name:
            raise GroupError(f"group {self.name}: a config of group {cfg.name} cannot be "
                             "taken live")
        self.cfg = self.commit.cfg = self.retention.cfg = cfg
        if not self.overridden and list(cfg.targets) != self.target_cfgs:
            self.set_targets(list(cfg.targets))

    async def promote(self, targets: list[TargetConfig] | None, force: bool) -> Generation:
        """This replica becomes the primary: a new generation starts after its last
        record. Refused for an inconsistent (being resynced) or split-brained image
        unless forced."""
        self.check_promotable(force)
        await self.commit.settle()
        await self.window.deactivate()  # every durable record applied: the delay is over
        self._drop_open_epoch()
        gen = self.lineage.begin(self.journal.last_seq + 1)
        self.role, self.source, self.overridden = "primary", None, True
        self.resync_base = None
        if targets is not None:
            self.set_targets(targets, member_at=gen.first_seq - 1)
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.commit.applied_seq))
        self.undo.remove()
        self.log.warning("group %s: promoted to primary, generation %s", self.name, gen)
        emit("promoted", self.name, generation=str(gen), first_seq=gen.first_seq,
             forced=force)
        return gen

    def check_promotable(self, force: bool) -> None:
        if self.role == "primary":
            raise GroupError(f"group {self.name} is already primary here")
        if self.inconsistent and not force:
            raise GroupError(f"group {self.name} is inconsistent here (a resync was "
                             f"interrupted; last consistent image: seq {self.resync_base.seq}); "
                             "roll it back first (replicator rollback), or force")
        if self.lineage.split_brain and not force:
            raise GroupError(f"group {self.name} is in split brain with "
                             f"{self.lineage.split_brain['peer']}; resolve it first, or force")

    async def rewind_to(self, to: str) -> tuple[Point, int, str]:
        """promote --at, before the promotion: the volumes go to the point `to` names
        (window.py), the records after it are set aside in a file of their own and the
        journal ends there. Returns (the point, how many records were set aside, their
        file)."""
        if self.inconsistent:
            raise GroupError(f"group {self.name} is being resynced here: no window to go "
                             "back in")
        await self.commit.settle()
        history = self.window.history
        history.pin()  # from the point's resolution to the undo: nothing dropped between
        try:
            point = self.window.resolve(to)
            keep = os.path.join(self.dir, f"kept-after-{point.seq}.journal")
            kept, keep = await self.window.rewind_in_place(point, keep)
        finally:
            history.unpin()
        self.log.warning("group %s: volumes taken to seq %d%s; %d later records set aside in "
                         "%s", self.name, point.seq,
                         f" (marker {point.marker})" if point.marker else "", kept, keep)
        return point, kept, keep

    def truncate_after(self, seq: int) -> None:
        """The journal ends at `seq` (the volumes hold its image; what came after it was
        set aside)."""
        self.journal.truncate_after(seq)
        self.commit.reset(seq)
        self.markers.cut(seq)

    async def caught_up(self) -> None:
        """Until everything accepted is durable and in the volumes (a deferred secondary's
        applier applies what waits, the delay notwithstanding: a switchover, a verify)."""
        await self.commit.settle()
        await self.apply_through(self.commit.consistent_seq)

    async def apply_through(self, seq: int) -> None:
        """A deferred secondary's volumes are brought to `seq` now (others are there)."""
        if self.window.active:
            await self.window.applier.catch_up(seq)

    def read(self, volume: str, offset: int, length: int) -> bytes:
        """What the group shows of a volume's range: the volume with the completed
        writes not in it yet laid over it (a resync sends this)."""
        return self.commit.read(self.volumes[volume], offset, length)

    def _drop_open_epoch(self) -> None:
        """A replica becoming primary: records of an epoch that never closed (its
        source went down mid-epoch) are no image anyone may build on: they go."""
        c = self.commit
        if c.consistent_seq < self.journal.last_seq:
            self.log.warning("group %s: records %d..%d were an epoch that never closed: "
                             "dropped (the image stays at seq %d)", self.name,
                             c.consistent_seq + 1, self.journal.last_seq, c.consistent_seq)
            self.journal.truncate_after(c.consistent_seq)
            c.drop_open_epoch()
            self.markers.cut(c.consistent_seq)

    async def mark(self, name: str, consistent: bool) -> Marker:
        """Primary: journal the marker `name` (group/markers.py) and make it durable with
        every write before it (a FLUSH); returns once it is."""
        self.check_mark(name)
        loop = asyncio.get_running_loop()
        written, durable = loop.create_future(), loop.create_future()
        seq, time_ns = self.commit.submit_marker(name, consistent, written.set_result)
        # Noted at once, as a replica notes the ones it receives (a periodic stream
        # splits its epochs at the records themselves), announced once durable.
        marker = self.markers.took(seq, name, time_ns, consistent, announce=False) \
            if seq else None
        err = await written
        if not err:
            self.commit.submit_flush(durable.set_result)
            err = await durable
        if err:
            if seq and err != errno.EBUSY:
                self.markers.cut(seq - 1)  # its batch failed: the journal does not hold it
            raise GroupError(f"marker {name!r}: {os.strerror(err)}"
                             + (" (a switchover holds writes)" if err == errno.EBUSY else ""))
        self.markers.announce(marker)
        return marker

    def check_mark(self, name: str) -> None:
        """Why the marker `name` cannot be taken here (GroupError), before any hook runs."""
        if self.role != "primary":
            raise GroupError(f"group {self.name} is {self.role} here: markers are taken on "
                             "the primary")
        if self.watched:
            raise GroupError(f"group {self.name} is watched: its consistent points are its "
                             "epochs, taken when its files change")
        if not NAME_RE.match(name):
            raise GroupError(f"marker name {name!r}: expected letters, digits, '.', '_', '-' "
                             "(max 63, starting alphanumeric)")
        held = self.markers.named(name)
        if held is not None:
            raise GroupError(f"marker {name!r} exists already (seq {held.seq}): names are "
                             "unique in a group")

    async def demote(self, source: str) -> None:
        """The primary becomes a secondary of `source`: writes are refused from now on,
        and it ships to nobody (the new primary does)."""
        if self.role != "primary":
            raise GroupError(f"group {self.name} is not primary here")
        self.role, self.source, self.overridden = "secondary", source, True
        self.set_targets([])
        await self.commit.settle()
        if self.window.wanted():
            await self.window.begin(self.commit.applied_seq)
            self._start_applier()
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.commit.applied_seq))
        self.log.warning("group %s: demoted to secondary of %s", self.name, source)
        emit("demoted", self.name, source=source)

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
            self._io, self._sync_and_save, self.journal.position(self.commit.applied_seq))
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
            self._io, self._sync_and_save, self.journal.position(self.commit.applied_seq))
        self.log.warning("group %s: re-parented: source is now %s", self.name, source)

    def adopt(self, history: list[Generation], source: str) -> None:
        """A sender whose line this image descends from (or is rolled back onto) is now
        its source: take its history (saved at the next checkpoint)."""
        if source != self.source:
            self.log.warning("group %s: source is now %s (was %s)", self.name, source,
                             self.source)
            self.source, self.overridden = source, True
            self._lineage_changed()
        if self.lineage.adopt(history):
            self._lineage_changed()

    def _lineage_changed(self) -> None:
        self.checkpoint.changed = True
        self._checkpoint_now.set()

    def _replay(self, after_seq: int, apply: bool,
                through: int | None = None) -> tuple[int, int, list]:
        """Apply the journal's records after `after_seq` onto the volumes, through the
        last one that closes an epoch (unless `apply` is False: a watched primary's files
        hold them; a deferred secondary's volumes go no further than `through`). Returns
        (records applied, that seq, the applies of the records after it)."""
        count, consistent, pending = 0, after_seq, []
        for _, _, data in self.journal.chunks(after_seq):
            for r in iterate(data):
                applying = apply and (through is None or r.seq <= through)
                if applying:
                    pending.append((volume_of(self.volumes, r, f"group {self.name}"), r.kind,
                                    r.offset, r.length, r.payload))
                if not r.flags & FLAG_OPEN:
                    apply_to_volumes(pending)
                    count += (r.seq - consistent) if applying else 0
                    consistent, pending = r.seq, []
        return count, consistent, pending

    @property
    def watched(self) -> bool:
        """Its volumes are files that programs write directly (capture: watch) and this
        node is the primary: the agent reads them, never writes them."""
        return self.role == "primary" and any(v.capture == "watch" for v in self.cfg.volumes)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._guarded(self.commit.start(), "committer"),
                                        name=f"commit-{self.name}"),
                       loop.create_task(self._guarded(self._checkpointer(), "checkpointer"),
                                        name=f"checkpoint-{self.name}"),
                       loop.create_task(self._guarded(self.guard.run(), "lag guard"),
                                        name=f"guard-{self.name}")]
        if self.window.active:
            self._start_applier()

    def _start_applier(self) -> None:
        self._tasks.append(self.window.start(self._guarded))

    async def _guarded(self, loop_coro, what: str) -> None:
        """Run one of the group's long-running loops; should it ever raise, the group
        fails loudly (status, log, every write answered with EIO), never a hang."""
        try:
            await loop_coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - anything: the group must say so
            self.log.exception("group %s: the %s failed", self.name, what)
            self.commit.halt(f"the {what} failed ({type(exc).__name__}: {exc}): no more writes "
                             "until the agent restarts")

    async def stop(self) -> None:
        """Finish what is queued, make it durable, checkpoint, close files."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.commit.stop()
        self._stopped_cleanly = self.commit.halted is None
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._sync_and_save, self.journal.position(self.commit.applied_seq))
        self._io.shutdown()
        self.journal.close()
        self.window.history.close()
        for vol in self.volumes.values():
            vol.close()

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
            await self.commit.settle()
            await self.window.resync_started()
            self.resync_base = self.journal.position()
            await loop.run_in_executor(self._io, self.undo.open)
            await loop.run_in_executor(self._io, self._sync_and_save, self.checkpoint.position)
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
        await self.commit.settle()
        self.resync_base = None
        self._resync_done = True
        self._had_image = True
        await loop.run_in_executor(self._io, self._sync_and_save, pos)
        self.journal.rebase(pos)
        self.markers.cut(pos.seq)  # (what this image held after it is gone)
        self._resync_done = False
        # The agent did not stop cleanly last time (kill -9 or power loss): the journal
        # may have lost records it had shipped, so a target may hold more than we do.
        self.unclean_start = False
        self._stopped_cleanly = False  # stop() says so in its last checkpoint
        self.undo.remove()
        for vol in self.volumes.values():
            vol.forget()  # what the resync read and wrote
        self.commit.reset(pos.seq)  # unapplied records: the resync wrote their image
        await self.window.resynced(pos.seq)
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
        await loop.run_in_executor(self._io, self._sync_and_save, self.checkpoint.position)
        self.undo.remove()
        await self.window.resynced(self.commit.applied_seq)
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
    def targets_changed(self) -> None:
        """A target acked or changed state: release the writes and flushes now covered,
        and let a waiting committer retry trimming."""
        self.commit.links_changed()
        if self.retention.journal_full:
            self._checkpoint_now.set()

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
        for rec in j.records(seq - 1):
            if rec.kind in CHANGING:
                bm.mark(rec.volume, rec.offset, rec.length)
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
        """Resync `t` from the image as it is now (config.RESYNC_MODES): `full` sends
        every region, `checksum` every region whose hash differs on the target,
        `assume-clean` none (the operator declares the target identical; writes from now
        on are still sent)."""
        bm = t.bitmap
        if t.bunker:
            mode = "assume-clean"  # a bunker holds no volumes: it restarts from our position
        bm.clear_all() if mode == "assume-clean" else bm.set_all()
        self._note_lacks_since(t)
        bm.through = self.journal.last_seq
        bm.active = True
        t.why = why
        t.resync_mode = mode
        t.resync_initial = initial
        t.resync_epoch += 1
        bm.save()
        self.checkpoint.changed = True  # record the mode in group.json
        self._checkpoint_now.set()
        self.log.warning("group %s: %s resync of %s (%s)", self.name, mode, t.node, why)

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
        self.checkpoint.changed = True
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
        bm.end_pass()
        bm.active, bm.through = False, seq
        t.reset_position(seq)
        t.lacks_since_ns = 0  # the journal holds what it lacks from now on
        t.finishing = False
        t.synced = True
        bm.save()
        self.checkpoint.changed = True
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
            elif self.retention.journal_full and not t.block and t.acked_seq < j.last_seq:
                self.start_logging(t, "the journal is full")  # writes wait for room
            elif j.bytes_between(t.acked_seq, j.last_seq) > self.cfg.logging_high_water:
                self.start_logging(t, "behind by more than logging_high_water")

    def _note_lacks_since(self, t: TargetLink) -> None:
        """Remember when the oldest write `t` lacks was journaled, while the journal
        still holds it (a logging target's records are trimmed away)."""
        if not t.lacks_since_ns and t.acked_seq < self.journal.last_seq:
            t.lacks_since_ns = self.journal.time_ns(t.acked_seq + 1) or time.time_ns()

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
            try:  # (not wait_for: on 3.11 it loses a cancel that comes with the event)
                async with asyncio.timeout(CHECKPOINT_INTERVAL):
                    await self._checkpoint_now.wait()
                asked = True
            except TimeoutError:
                asked = False
            self._checkpoint_now.clear()
            try:
                self.commit.retry_applies()
                self._update_logging()
                pos = self.journal.position(self.commit.applied_seq)
                acked = {n: t.acked_seq for n, t in self.targets.items()}
                cp = self.checkpoint
                changed = pos != cp.position or acked != cp.saved_acked
                j = self.journal
                due = (asked or cp.changed
                       or time.monotonic() - synced_at >= SYNC_INTERVAL
                       or j.bytes_between(cp.position.seq, pos.seq) > j.capacity // 4
                       or j.used_bytes > j.capacity // 2)  # trim as it fills, not when full
                if self.checkpoint.changed or (changed and due):
                    await loop.run_in_executor(None, self._sync_and_save, pos, acked)
                    synced_at = time.monotonic()
                await self.window.trim()
                await self.retention.trim()
            except (OSError, JournalError) as exc:
                self.log.error("group %s: checkpoint failed: %s", self.name, exc)
            self.retention.room_made()

    async def in_io(self, fn, *args):
        """fn(*args) in the group's io worker (what must not run on the loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def save_checkpoint(self, pos: Position) -> None:
        await self.in_io(self._sync_and_save, pos)

    def _sync_and_save(self, pos: Position, acked: dict | None = None) -> None:
        """Checkpoint the volumes at `pos` (checkpoint.py). Runs in the checkpointer's
        thread and in the io worker."""
        acked = acked if acked is not None else {n: t.acked_seq for n, t in self.targets.items()}
        self.checkpoint.save(self.volumes.values(), pos, acked, self._state)

    def _state(self, acked: dict) -> dict:
        """What group.json keeps besides the checkpoint: targets' acked seqs and more."""
        state = {"acked": {**self._acked_saved, **acked}, **self.lineage.state(),
                 **self.markers.state(),
                 "has_image": self.has_image, "clean": self._stopped_cleanly,
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
        return state

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
