"""The agent: composes groups, their shippers, the replication listener, the NBD server
and the admin socket for one node, and runs them until SIGTERM/SIGINT.

Start order: every group recovers (journal scan, replay onto volumes) before anything
listens, so no client ever sees a volume that is not yet consistent. Stop order is the
reverse: stop accepting, stop shipping, finish queued writes, checkpoint, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import time
from typing import Callable

from .admin import AdminError, AdminServer
from .capture.export import VolumeExport
from .capture.nbd import NbdServer
from .capture.watch import Watcher
from . import reload
from .credentials import Credentials
from .config import (COMPRESSIONS, MODES, ON_DISCONNECT, RESYNC_MODES, Config, ConfigError,
                     TargetConfig, load)
from .events import EVENTS, emit
from .failover import Failover
from .group import Group, GroupError
from .hooks import HookError, run_hook
from .metrics import MetricsServer
from .offload.relay import Relay
from .receiver import Receiver
from .report import child_report, node_report, with_lag
from .shipping import Shipper, ShipError

NBD_MAX_REQUEST = 4 << 20
NOFILE_CAP = 1 << 20  # the soft RLIMIT_NOFILE is raised to the hard limit, at most this
WATCH_INTERVAL = 1.0  # seconds between the agent's looks at what no callback announces
JOURNAL_NEARLY_FULL, JOURNAL_BELOW = 0.8, 0.7  # fractions of a journal: event, re-armed
RESYNC_PROGRESS_EVERY = 5.0  # seconds between resync_progress events of a running resync
log = logging.getLogger("replicator.agent")


class Agent:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.groups = {g.name: Group(g, cfg.state_dir) for g in cfg.groups}
        self.watchers = {name: Watcher(g) for name, g in self.groups.items()
                         if any(v.capture == "watch" for v in g.cfg.volumes)}
        self.shippers: dict[str, list[Shipper]] = {}
        self.exports: dict[str, VolumeExport] = {}
        self.credentials = Credentials(cfg.tls)  # read at each connection: reload renews it
        # group -> far target -> its relay of processed records (offload/relay.py)
        self.relays: dict[str, dict[str, Relay]] = {}
        self.receiver = Receiver(cfg.node, self.groups, heartbeat_timeout=cfg.heartbeat_timeout,
                                 peers=cfg.peers, promote=self._promote_to,
                                 credentials=self.credentials, relays=self.relays,
                                 report=self._tree)
        self.failover = Failover(cfg, self.receiver, self.shippers, self._sync_shippers,
                                 credentials=self.credentials)
        self.nbd = NbdServer(lambda: self.exports, max_request=NBD_MAX_REQUEST,
                             handshake_timeout=cfg.nbd_handshake_timeout,
                             max_connections=cfg.nbd_max_connections,
                             max_connections_per_export=cfg.nbd_max_connections_per_export)
        self.nbd.tls_context, self.nbd.grants = self.credentials.nbd, cfg.nbd_clients
        self.admin = AdminServer(cfg.admin_socket, {"status": self._status,
                                                    "rollback": self._rollback,
                                                    "resync": self._resync,
                                                    "verify": self._verify,
                                                    "promote": self._promote,
                                                    "demote": self._demote,
                                                    "switchover": self._switchover,
                                                    "failback": self._failback,
                                                    "resolve": self._resolve,
                                                    "attach": self._attach,
                                                    "reparent": self._reparent,
                                                    "restore": self._restore,
                                                    "mark": self._mark,
                                                    "rewind": self._rewind,
                                                    "markers": self._markers,
                                                    "reload": self._reload},
                                 streams={"events": self._events})
        self.metrics = MetricsServer(self) if cfg.metrics_listen is not None else None
        self.started = time.time()
        self._watch_task: asyncio.Task | None = None
        self._nearly_full: set[str] = set()  # groups whose journal_nearly_full is out
        self._reloading = asyncio.Lock()  # one reload at a time (SIGHUP and admin socket)

    async def start(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        for group in self.groups.values():
            group.logging_after = self.cfg.heartbeat_timeout
            group.open()
            group.start()
            self.exports.update({name: VolumeExport(group, vol)
                                 for name, vol in group.volumes.items()})
            self._sync_relays(group)
            self.shippers[group.name] = [self._shipper_for(group, t) for t in group.target_cfgs]
            await self._sync_watcher(group)
        await self.receiver.start(*self.cfg.listen)
        if self.cfg.nbd_socket:
            await self.nbd.start_unix(self.cfg.nbd_socket, self.cfg.nbd_socket_mode,
                                      self.cfg.nbd_socket_group)
        if self.cfg.nbd_listen:
            await self.nbd.start(*self.cfg.nbd_listen)
        if self.cfg.nbd_tls_listen:
            await self.nbd.start(*self.cfg.nbd_tls_listen, tls=True)
        await self.admin.start()
        if self.metrics is not None:
            await self.metrics.start(*self.cfg.metrics_listen)
        emit("agent_started", node=self.cfg.node, pid=os.getpid())
        for shippers in self.shippers.values():
            for shipper in shippers:
                shipper.start()
        self._watch_task = asyncio.create_task(self._watch(), name="agent-watch")
        log.info("node %s up: replication on %s:%d, NBD on %s, %d group(s)%s",
                 self.cfg.node, *self.cfg.listen, ", ".join(self.nbd.listeners), len(self.groups),
                 ", metrics on http://%s:%d/metrics" % self.cfg.metrics_listen
                 if self.metrics is not None else "")

    async def _watch(self) -> None:
        """Each WATCH_INTERVAL: announce the state changes no callback announces (a
        target switched to logging by its group), a journal over JOURNAL_NEARLY_FULL,
        and the progress of running resyncs."""
        progress: dict[Shipper, float] = {}
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            for group in self.groups.values():
                self._watch_journal(group)
                for shipper in self.shippers.get(group.name, []):
                    shipper.announce()
                    r = shipper.resync
                    if r is None:
                        progress.pop(shipper, None)
                    elif now - progress.setdefault(shipper, now) >= RESYNC_PROGRESS_EVERY:
                        progress[shipper] = now
                        st = r.status()
                        emit("resync_progress", group.name, shipper.target.node,
                             done_bytes=st["done_bytes"], total_bytes=st["total_bytes"],
                             rate_bytes_per_s=st["rate_bytes_per_s"],
                             eta_seconds=st["eta_seconds"])

    def _watch_journal(self, group: Group) -> None:
        j = group.journal
        used = j.used_bytes / j.capacity if j.capacity else 0.0
        if used >= JOURNAL_NEARLY_FULL and group.name not in self._nearly_full:
            self._nearly_full.add(group.name)
            emit("journal_nearly_full", group.name, used_bytes=j.used_bytes,
                 capacity_bytes=j.capacity)
        elif used < JOURNAL_BELOW and group.name in self._nearly_full:
            self._nearly_full.discard(group.name)
            emit("journal_below_limit", group.name, used_bytes=j.used_bytes,
                 capacity_bytes=j.capacity)

    async def _events(self, request: dict):
        """The event stream (events.py) after `since`, and with `follow` every new one."""
        since, stream = request.get("since") or 0, request.get("stream")
        if not isinstance(since, int) or since < 0:
            raise AdminError(f"events: since must be an event seq (a count); got {since!r}")
        if stream is not None and not isinstance(stream, str):
            raise AdminError(f"events: stream must be status's event_stream; got {stream!r}")
        async for event in EVENTS.read(since, bool(request.get("follow")), stream):
            yield event

    def _shipper_for(self, group: Group, t: TargetConfig) -> Shipper:
        if t.node not in self.cfg.peers:
            raise AdminError(f"{t.node!r} is not in this node's peers (address book): "
                             f"known: {', '.join(sorted(self.cfg.peers))}")
        return Shipper(group, group.targets[t.node], node=self.cfg.node,
                       address=self.cfg.peers[t.node], compress=t.compress == "zstd",
                       zstd_level=t.compress_level,
                       heartbeat_interval=self.cfg.heartbeat_interval,
                       heartbeat_timeout=self.cfg.heartbeat_timeout,
                       sync_ack_timeout=self.cfg.sync_ack_timeout,
                       stall_timeout=self.cfg.stall_timeout,
                       initial_sync=t.initial_sync, credentials=self.credentials,
                       relays=self.relays.setdefault(group.name, {}))

    def _sync_relays(self, group: Group) -> None:
        """The group's relays (offload/relay.py) match its processed targets: one per far
        target, kept while its configuration stays (the dict is the shippers' and the
        receiver's, changed in place)."""
        relays = self.relays.setdefault(group.name, {})
        want = {t.node: t for t in group.target_cfgs if t.process}
        for node in list(relays):
            if node not in want or relays[node].cfg != want[node]:
                del relays[node]
        for node, t in want.items():
            if node not in relays:
                relays[node] = Relay(t, via=t.via)

    async def _sync_shippers(self, group: Group, replace: set[str] | frozenset = frozenset()) -> None:
        """Start and stop shippers so that they match the group's targets (and a
        watched group's watcher its role: before the shippers read its volumes); the
        shippers to the nodes of `replace` are made anew (a reload changed their link)."""
        await self._sync_watcher(group)
        self._sync_relays(group)
        keep = []
        for shipper in self.shippers.get(group.name, []):
            t = shipper.target
            if group.targets.get(t.node) is t and t.node not in replace \
                    and shipper.compress == (t.cfg.compress == "zstd") \
                    and shipper.zstd_level == t.cfg.compress_level:
                keep.append(shipper)
            else:
                await shipper.stop()
        have = {s.target.node for s in keep}
        for t in group.target_cfgs:
            if t.node not in have:
                shipper = self._shipper_for(group, t)
                shipper.start()
                keep.append(shipper)
        self.shippers[group.name] = keep

    async def _sync_watcher(self, group: Group) -> None:
        """A watched group's files are watched while (and only while) it is primary here
        (stopped, its volumes are a replica's: opened now)."""
        watcher = self.watchers.get(group.name)
        if watcher is not None and not (watcher.running and group.watched):
            await (watcher.start() if group.watched else watcher.stop())

    def _peer(self, request: dict, key: str, what: str) -> str:
        node = request.get(key)
        if node not in self.cfg.peers:
            raise AdminError(f"{what}, one of this node's peers (got {node!r}): "
                             f"{', '.join(sorted(self.cfg.peers))}")
        return node

    def _check_targets(self, targets: list[TargetConfig]) -> None:
        unknown = [t.node for t in targets if t.node not in self.cfg.peers]
        if unknown:
            raise AdminError(f"{', '.join(unknown)} not in this node's peers (address book); "
                             f"known: {', '.join(sorted(self.cfg.peers))}")

    async def _promote_to(self, group: Group, targets: list[TargetConfig] | None) -> dict:
        """A HANDOVER from our primary makes this node the group's primary (the receiver
        answers a GroupError with a refusal)."""
        return await self.failover.promote_to(group, targets)

    async def _promote(self, request: dict) -> dict:
        group = self._group(request)
        targets = request.get("targets")
        if targets is not None:
            targets = [_target(t) for t in targets]
            self._check_targets(targets)
            targets = [t for t in group.target_cfgs if t.node not in {x.node for x in targets}] \
                + targets
        force = bool(request.get("force"))
        bunker = None if request.get("no_bunker") else request.get("bunker") or group.cfg.bunker
        with _context(group, "promote"):
            if request.get("at"):
                if request.get("copy"):
                    raise AdminError("promote takes --at or --copy, not both: a copy at a point "
                                     "is `replicator rewind --to POINT --copy DIR`")
                return await self.failover.promote_at(group, str(request["at"]), targets,
                                                      force=force)
            if request.get("copy"):
                return await self.failover.promote_copy(
                    group, os.path.abspath(request["copy"]), bunker=bunker, force=force)
            return await self.failover.promote(group, targets, bunker=bunker, force=force)

    async def _rewind(self, request: dict) -> dict:
        group = self._group(request)
        if not request.get("to") or not request.get("copy"):
            raise AdminError("rewind needs --to SEQ|TIME|MARKER and --copy DIR")
        with _context(group, "rewind"):
            return await self.failover.rewind_copy(group, str(request["to"]),
                                                   os.path.abspath(request["copy"]))

    async def _demote(self, request: dict) -> dict:
        group = self._group(request)
        source = self._peer(request, "source", "demote needs the new primary as --source")
        with _context(group, "demote"):
            return await self.failover.demote(group, source)

    async def _failback(self, request: dict) -> dict:
        group, shipper = self._on_primary(request, "failback", "the current primary")
        with _context(group, "failback"):
            async with self._handover(group):
                return await self.failover.failback(
                    group, shipper, float(request.get("rejoin_timeout") or 600),
                    float(request.get("drain_timeout") or 60))

    async def _switchover(self, request: dict) -> dict:
        group, shipper = self._on_primary(request, "switchover", "the primary")
        with _context(group, "switchover"):
            async with self._handover(group):
                return await self.failover.switchover(
                    group, shipper, float(request.get("drain_timeout") or 60))

    @contextlib.asynccontextmanager
    async def _handover(self, group: Group):
        """A switchover (or failback) of a watched group: its files' last changes are one
        more epoch before the drain, and none is journaled until the handover is over."""
        watcher = self.watchers.get(group.name)
        try:
            if watcher is not None:
                await watcher.hold()
            yield
        finally:
            if watcher is not None:
                watcher.release()

    async def _attach(self, request: dict) -> dict:
        """Ship to one more target from now on (a re-parented downstream replica)."""
        group = self._group(request)
        target = _target(request.get("target") or {})
        self._check_targets([target])
        if target.node in group.targets:
            raise AdminError(f"group {group.name} already ships to {target.node}")
        group.overridden = True
        group.set_targets(group.target_cfgs + [target])
        await self._sync_shippers(group)
        return {"group": group.name, "targets": [t.node for t in group.target_cfgs]}

    async def _reparent(self, request: dict) -> dict:
        group = self._group(request)
        source = self._peer(request, "source", "reparent needs the new source")
        with _context(group, "reparent"):
            await group.reparent(source)
        await self._sync_shippers(group)  # the new source is no longer a target
        return {"group": group.name, "source": group.source,
                "targets": [t.node for t in group.target_cfgs]}

    async def _restore(self, request: dict) -> dict:
        group = self._group(request)
        with _context(group, "restore"):
            changed = await group.restore()
        await self._sync_shippers(group)
        return {"group": group.name, "role": group.role, "source": group.source,
                "targets": [t.node for t in group.target_cfgs], "changed": changed}

    async def _mark(self, request: dict) -> dict:
        """A marker on the primary, between the freeze and thaw hooks when given (the
        thaw runs whatever happened after the freeze began)."""
        group = self._group(request)
        freeze, thaw = request.get("freeze"), request.get("thaw")
        if bool(freeze) != bool(thaw):
            raise AdminError("mark: --freeze and --thaw go together (every freeze must be "
                             "undone)")
        timeout = float(request.get("hook_timeout") or 30)
        name = str(request.get("name") or "")
        marker = None
        with _context(group, "mark"):
            group.check_mark(name)  # before the application is frozen for nothing
            try:
                if freeze:
                    await run_hook("freeze", freeze, timeout)
                marker = await group.mark(name, bool(freeze))
            except HookError as exc:
                raise AdminError(f"mark of group {group.name}: {exc}: no marker") from None
            finally:
                if thaw:
                    try:
                        await run_hook("thaw", thaw, timeout)
                    except HookError as exc:
                        taken = (f"marker {name} was taken at seq {marker.seq}"
                                 if marker is not None else "no marker was taken")
                        raise AdminError(f"mark of group {group.name}: {exc} ({taken}; the "
                                         "application may still be frozen)") from None
        return {"group": group.name, **marker.as_dict()}

    async def _markers(self, request: dict) -> dict:
        group = self._group(request)
        first = group.journal.first_seq
        return {"group": group.name, "journal_first_seq": first,
                "markers": [{**m.as_dict(), "in_journal": m.seq >= first} for m in group.markers]}

    async def _reload(self, request: dict) -> dict:
        """`config`: the file the operator named; a dry run may name any (what reloading
        it would do: the role's check mode), a reload only the agent's own."""
        dry_run, path = bool(request.get("dry_run")), request.get("config")
        own = os.path.realpath(self.cfg.source_path)
        if path is not None and not isinstance(path, str):
            raise AdminError(f"reload: config must be a file's path; got {path!r}")
        if not dry_run and path is not None and os.path.realpath(path) != own:
            raise AdminError(f"reload: this agent runs with {own}, not {path}; a reload "
                             "re-reads the agent's own file (a --dry-run may name another)")
        return await self.reload(dry_run, path if dry_run else None)

    async def reload(self, dry_run: bool = False, path: str | None = None) -> dict:
        """Re-read the config file (a dry run: `path`, if given) and take what changed
        live (reload.py), all of it or nothing: an invalid file, a change that needs a
        restart, or one the running state contradicts (AdminError) changes nothing. The
        answer is reload.outcome's."""
        async with self._reloading:
            path = path or self.cfg.source_path
            try:
                new = load(path)
            except ConfigError as exc:
                errors = str(exc).splitlines()
                self._refused(dry_run, f"{path} is invalid", errors=errors)
                return reload.outcome([], dry_run=dry_run, errors=errors)
            changes = reload.diff(self.cfg, new)
            answer = reload.outcome(changes, dry_run=dry_run)
            if answer["restart_required"]:
                self._refused(dry_run, f"{path} changes {', '.join(answer['restart_required'])}"
                              ", which needs a restart",
                              restart_required=answer["restart_required"])
                return answer
            conflict = self._conflict(changes)
            if conflict:
                self._refused(dry_run, conflict, errors=[conflict])
                raise AdminError(f"{conflict}; nothing changed")
            try:  # the TLS files are read again, whether or not their paths changed
                if dry_run:
                    Credentials(new.tls)
                    return answer
                self._renew(new)
            except OSError as exc:
                self._refused(dry_run, str(exc), errors=[str(exc)])
                return reload.outcome([], dry_run=dry_run, errors=[str(exc)])
            if changes:
                await self._apply(new, changes)
                log.info("reload: %s applied: %s", path, ", ".join(c.key for c in changes))
                emit("config_reloaded", node=self.cfg.node, path=path,
                     changes=answer["changes"])
            return {**answer, "reloaded": True}

    def _renew(self, cfg: Config) -> None:
        """Read the TLS files of `cfg` again: every connection from now on uses them."""
        old = self.credentials.cert
        self.credentials.reload(cfg.tls)
        self.nbd.tls_context = self.credentials.nbd
        new = self.credentials.cert
        if old is not None and new is not None and old.serial_number != new.serial_number:
            log.info("reload: TLS certificate renewed (%s, valid until %s)",
                     new.subject.rfc4514_string(), new.not_valid_after_utc.isoformat())

    def _refused(self, dry_run: bool, why: str, errors: list[str] | tuple = (),
                 restart_required: list[str] | tuple = ()) -> None:
        """A reload that changes nothing: said in the log and as an event (not for a
        dry run, which never was to change anything)."""
        if dry_run:
            return
        log.error("reload: %s; nothing changed%s", why,
                  "".join(f"\n  {e}" for e in errors if e != why))
        emit("config_reload_refused", node=self.cfg.node, path=self.cfg.source_path,
             errors=list(errors), restart_required=list(restart_required))

    def _conflict(self, changes: list[reload.Change]) -> str | None:
        """What in the running state contradicts live `changes`: new targets for a group
        whose targets a runtime role change set, or the removal of a peer such a group
        still ships to. None: nothing."""
        runtime = {name for name, g in self.groups.items() if g.overridden}
        for c in changes:
            if c.path[:1] == ("groups",) and c.path[2:3] == ("targets",) \
                    and c.path[1] in runtime:
                return (f"{c.key} changed, but group {c.path[1]}'s role and targets were set "
                        "at runtime (promote, demote, attach...): run `replicator restore` "
                        "first, or leave its targets as they are")
            if c.path[0] == "peers" and c.new is None:
                users = [g for g in sorted(runtime)
                         if c.path[1] in {t.node for t in self.groups[g].target_cfgs}]
                if users:
                    return (f"{c.key} removed, but group(s) {', '.join(users)} still ship to "
                            f"{c.path[1]} (targets set at runtime)")
        return None

    async def _apply(self, new: Config, changes: list[reload.Change]) -> None:
        """Take `new`, whose `changes` are all live: the parts holding each change take it,
        and the shippers whose link changed reconnect with it (NBD clients, the receiver's
        sessions and the other shippers go on)."""
        self.cfg = self.failover.cfg = new
        logging.getLogger().setLevel(new.log_level.upper())
        self.receiver.reconfigure(new.peers, new.heartbeat_timeout)
        self.nbd.grants = new.nbd_clients
        self.nbd.set_limits(handshake_timeout=new.nbd_handshake_timeout,
                            max_connections=new.nbd_max_connections,
                            max_connections_per_export=new.nbd_max_connections_per_export)
        timers = {"heartbeat_interval", "heartbeat_timeout", "sync_ack_timeout", "stall_timeout"}
        every_link = any(c.path[0] in timers for c in changes)
        peers = {c.path[1] for c in changes if c.path[0] == "peers"}
        for group in self.groups.values():
            cfg = new.group(group.name)
            changed = {c.path[3] for c in changes
                       if c.path[:3] == ("groups", group.name, "targets")}
            group.logging_after = new.heartbeat_timeout
            group.reconfigure(cfg)
            if ("groups", group.name, "resync_rate") in {c.path for c in changes}:
                for shipper in self.shippers.get(group.name, []):
                    shipper.resync_rate = cfg.resync_rate
            await self._sync_shippers(group, set(group.targets) if every_link
                                      else changed | peers)

    async def _resolve(self, request: dict) -> dict:
        group = self._group(request)
        if not request.get("discard_local"):
            raise AdminError("resolve only takes --discard-local (run it on the node whose "
                             "writes since the split are given up)")
        survivor = self._peer(request, "survivor", "resolve needs the --survivor")
        with _context(group, "resolve"):
            return await self.failover.resolve(group, survivor)

    async def stop(self) -> None:
        emit("agent_stopping", node=self.cfg.node)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.metrics is not None:
            await self.metrics.close()
        await self.admin.close()
        await self.nbd.close()
        await self.receiver.close()
        for watcher in self.watchers.values():
            await watcher.stop()
        for shippers in self.shippers.values():
            for shipper in shippers:
                await shipper.stop()
        for group in self.groups.values():
            await group.stop()
        log.info("node %s stopped", self.cfg.node)

    async def _status(self, request: dict) -> dict:
        wanted = request.get("group")
        if wanted is not None and wanted not in self.groups:
            raise AdminError(f"no group {wanted!r} on node {self.cfg.node}")
        return {
            "node": self.cfg.node,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "nbd": {**self.nbd.connection_counts(), "listeners": self.nbd.listeners},
            "tls": self.credentials.status(),
            "event_seq": EVENTS.seq,  # `replicator events --since` this misses nothing
            "event_stream": EVENTS.stream,  # (and --stream this: a restart is said)
            "groups": [self._group_status(g) for g in self.groups.values()
                       if wanted in (None, g.name)],
        }

    def _group(self, request: dict) -> Group:
        name = request.get("group")
        if name not in self.groups:
            raise AdminError(f"no group {name!r} on node {self.cfg.node} "
                             f"(groups: {', '.join(self.groups) or 'none'})")
        return self.groups[name]

    def _on_primary(self, request: dict, op: str, where: str) -> tuple[Group, Shipper]:
        """The group of `request`, which must be primary here, and its shipper to `to`."""
        group = self._group(request)
        if group.role != "primary":
            raise AdminError(f"group {group.name} is {group.role} on {self.cfg.node}; run the "
                             f"{op} on {where}")
        return group, self._shipper(group, request.get("to"))

    def _shipper(self, group: Group, target: str) -> Shipper:
        for shipper in self.shippers.get(group.name, []):
            if shipper.target.node == target:
                return shipper
        raise AdminError(f"group {group.name} on node {self.cfg.node} does not ship to "
                         f"{target!r} (targets: {', '.join(group.targets) or 'none'})")

    async def _rollback(self, request: dict) -> dict:
        group = self._group(request)
        if self.receiver.status(group.name) is not None and not request.get("force"):
            raise AdminError(f"group {group.name}: the source is still connected and resyncing; "
                             "stop it first, or use --force")
        with _context(group, "rollback"):
            restored = await group.rollback()
        return {"group": group.name, "regions_restored": restored,
                "consistent_seq": group.journal.last_seq}

    async def _resync(self, request: dict) -> dict:
        """Tune a target's resync rate, and/or start a resync of it: `full`, `checksum`
        or `assume-clean` (declare it identical: nothing is sent but later writes)."""
        group = self._group(request)
        shipper = self._shipper(group, request.get("target"))
        rate, mode = request.get("rate"), request.get("mode")
        if rate is not None:
            shipper.resync_rate = int(rate)
        if mode is not None:
            if mode not in RESYNC_MODES:
                raise AdminError(f"resync mode {mode!r}: expected one of "
                                 f"{', '.join(RESYNC_MODES)}")
            if group.inconsistent:
                raise AdminError(f"group {group.name} on {self.cfg.node} is itself being "
                                 "resynced: it has no consistent image to send")
            group.request_resync(shipper.target, mode, "requested by the operator",
                                 initial=shipper.target.resync_initial and shipper.target.logging)
            shipper.poke()
        return {"group": group.name, "target": shipper.target.node,
                "rate_limit_bytes_per_s": shipper.resync_rate, "state": shipper.status()["state"]}

    async def _verify(self, request: dict) -> dict:
        group = self._group(request)
        shipper = self._shipper(group, request.get("target"))
        volume = request.get("volume")
        if volume is not None and volume not in group.volumes:
            raise AdminError(f"group {group.name} has no volume {volume!r} "
                             f"(volumes: {', '.join(group.volumes)})")
        offset, length = int(request.get("offset") or 0), request.get("length")
        ranges = [(name, offset if volume else 0, length if volume else None)
                  for name in ([volume] if volume else group.volumes)]
        try:
            result = await shipper.verify(ranges)
            result["repaired"] = result["repaired_bytes"] = 0
            if request.get("repair") and result["mismatches"]:
                repaired = await asyncio.wait_for(shipper.repair(result["mismatches"]),
                                                  float(request.get("repair_timeout") or 3600))
                result["repaired"], result["repaired_bytes"] = repaired["regions"], repaired["bytes"]
        except ShipError as exc:
            raise AdminError(f"verify of {group.name} -> {shipper.target.node}: {exc}") from None
        except asyncio.TimeoutError:
            raise AdminError(f"verify of {group.name} -> {shipper.target.node}: the repair "
                             "resync did not finish in time; it goes on (see status)") from None
        return result

    def _group_status(self, group: Group) -> dict:
        j = group.journal
        return {
            "name": group.name,
            "role": group.role,
            "source": group.source,
            "upstream": self.receiver.status(group.name),
            # The durability contract's points: journaled (written), durable (fdatasync'd)
            # and the last flush point (what a completed FLUSH or FUA promised).
            "seq": group.commit.written_seq,
            "durable_seq": group.commit.durable_seq,
            "flush_seq": group.commit.flush_seq,
            "applied_seq": group.commit.applied_seq,
            "checkpoint_seq": group.checkpoint.position.seq,
            "inconsistent": group.inconsistent,
            "generation": str(group.lineage.history[-1]) if group.lineage.history else None,
            "generations": len(group.lineage.history),
            "split_brain": group.lineage.split_brain,
            "role_from": "runtime" if group.overridden else "config",
            "discarded": group.lineage.discarded,
            "writes_blocked_by": group.targets.blocked_by,
            "writes_halted": group.commit.halted or group.commit.volume_error,
            "bunker": group.retention.bunker_status(),
            "consistent_seq": (group.resync_base.seq if group.inconsistent
                               else group.commit.applied_seq),
            # Records of an epoch that does not close yet (journaled, not shown or applied).
            "open_epoch": ([group.commit.consistent_seq + 1, group.commit.durable_seq]
                           if group.commit.consistent_seq < group.commit.durable_seq else None),
            "journal": {"first_seq": j.first_seq, "used_bytes": j.used_bytes,
                        "capacity_bytes": j.capacity,
                        "full": group.retention.journal_full or group.commit.journal_no_space},
            "volumes": [{"name": v.name, "path": v.path, "size": v.size}
                        for v in group.volumes.values()],
            "markers": group.markers.status(),
            "window": group.window.status(),
            "targets": [s.status() for s in self.shippers.get(group.name, [])],
            "watch": self.watchers[group.name].status() if group.name in self.watchers else None,
            "tree": with_lag(self._tree(group), group),
        }

    def _tree(self, group: Group) -> dict:
        """This node's replication tree of `group` (report.py): what it sends upstream."""
        return node_report(self.cfg.node, group, [
            child_report(s.target.node, s.report, s.report_received)
            for s in self.shippers.get(group.name, [])])


@contextlib.contextmanager
def _context(group: Group, operation: str):
    """A GroupError of an admin request, for the operator: which group, which operation."""
    try:
        yield
    except GroupError as exc:
        raise AdminError(f"{operation} of group {group.name}: {exc}") from None


def _target(t: dict) -> TargetConfig:
    try:
        target = TargetConfig(node=t["node"], mode=t.get("mode", "async"),
                              compress=t.get("compress", "none"),
                              on_disconnect=t.get("on_disconnect", "continue"),
                              bunker=t.get("bunker", False), interval=t.get("interval"))
    except (KeyError, TypeError):
        raise AdminError(f"bad target {t!r}: expected {{node, mode}}") from None
    periodic = target.mode == "periodic"
    if periodic != (target.interval is not None) or periodic and not (
            isinstance(target.interval, (int, float)) and 0.1 <= target.interval <= 86400):
        raise AdminError(f"target {target.node}: a periodic target needs an interval in "
                         "seconds (0.1..86400), and only a periodic one has one")
    if target.mode not in MODES or target.compress not in COMPRESSIONS \
            or target.on_disconnect not in ON_DISCONNECT or target.bunker not in (True, False):
        raise AdminError(f"target {target.node}: mode must be one of {', '.join(MODES)}, "
                         f"compress one of {', '.join(COMPRESSIONS)}, on_disconnect one of "
                         f"{', '.join(ON_DISCONNECT)}, bunker true or false")
    if target.bunker and target.mode != "sync":
        raise AdminError(f"target {target.node}: a bunker keeps a synchronous copy of the "
                         "journal: its mode must be sync")
    return target


def _reloaded(task: asyncio.Task) -> None:
    """The end of a SIGHUP's reload: a refusal is logged and an event already; a bug is
    logged here (the answer has no reader)."""
    exc = None if task.cancelled() else task.exception()
    if exc is not None and not isinstance(exc, AdminError):
        log.error("reload failed", exc_info=exc)


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most NOFILE_CAP): the default
    soft limit (1024) is what idle NBD clients once exhausted. The NBD server keeps a
    reserve below whatever limit is in force (capture/nbd.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # (some containers allow ~2**30: of no use, and slow for anything that scans them)
    want = NOFILE_CAP if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CAP)
    if soft == resource.RLIM_INFINITY or soft >= want:
        log.info("RLIMIT_NOFILE is %s", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, want, exc)
        return
    log.info("RLIMIT_NOFILE raised from %d to %d (hard limit %s)", soft, want, hard)


def event_loop() -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The agent's event loop, and its name for the log: uvloop's where it is installed
    (libuv: less CPU per NBD request and per frame than asyncio's selector loop), else
    asyncio's own, which runs the same code."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop, "asyncio (uvloop not installed)"
    return uvloop.new_event_loop, "uvloop"


async def run(cfg: Config) -> int:
    raise_nofile_limit()
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = asyncio.Event()  # a SIGHUP while the agent starts reloads once it is up
    reloads: set[asyncio.Task] = set()  # (held: the loop keeps only weak references)

    async def reload_when_started() -> None:
        await started.wait()
        await agent.reload()

    def hangup() -> None:
        task = asyncio.create_task(reload_when_started(), name="reload")
        reloads.add(task)
        task.add_done_callback(_reloaded)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    await agent.start()
    started.set()
    await stop.wait()
    log.info("signal received, shutting down")
    for task in reloads:
        task.cancel()
    await asyncio.gather(*reloads, return_exceptions=True)
    await agent.stop()
    return 0
