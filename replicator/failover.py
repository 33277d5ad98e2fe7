"""Failover: the moves of the primary role between this node and its peers.

  promote     a secondary takes over (an unplanned failover), first bringing itself
              forward from the group's bunker, if it has one; `promote_copy` does the
              same into a snapshot that goes on alone (a DR drill), and `promote_to` is
              what a HANDOVER from our primary does.
  switchover  the planned move to a replicating target: hold writes, drain every
              streaming target, name the successor to the others, hand over, demote.
  failback    after a takeover, wait for the old primary to rejoin, then switch over.
  demote      this node follows a new primary.
  resolve     split brain, on the loser: take the survivor's line.
Waits are on the shippers' change events (acked seq, state), never polls. Errors are
AdminError for the operator; the agent adds the group and operation to a GroupError.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import snapshot
from .admin import AdminError
from .bunker import BunkerError
from .bunker import replay as bunker_replay
from .config import Config, TargetConfig
from .group import Group, GroupError
from .receiver import Receiver
from .shipping import Shipper, ShipError

log = logging.getLogger("replicator.failover")


class Failover:
    def __init__(self, cfg: Config, receiver: Receiver, shippers: dict[str, list[Shipper]],
                 sync_shippers, credentials):
        self.cfg = cfg
        self.receiver = receiver  # its upstream status, and switching: its HANDOVER gate
        self.shippers = shippers  # the agent's, by group
        self.sync_shippers = sync_shippers  # async (group): shippers to match its targets
        self.credentials = credentials  # its client context, for the bunker

    async def promote_to(self, group: Group, targets: list[TargetConfig] | None,
                         force: bool = False) -> dict:
        """Make this node the group's primary, shipping to `targets` (None: as
        configured)."""
        known = [t for t in targets or [] if t.node in self.cfg.peers]
        for t in targets or []:
            if t.node not in self.cfg.peers:
                log.warning("group %s: cannot ship to %s after the promotion: not in peers",
                            group.name, t.node)
        started = time.monotonic()
        gen = await group.promote(known if targets is not None else None, force)
        await self.sync_shippers(group)
        return {"group": group.name, "role": group.role, "generation": str(gen),
                "seq": group.journal.last_seq, "targets": [t.node for t in group.target_cfgs],
                "seconds": round(time.monotonic() - started, 3)}

    async def promote(self, group: Group, targets: list[TargetConfig] | None, *,
                      bunker: str | None, force: bool) -> dict:
        """Takeover by this secondary, after replaying what `bunker` holds past us."""
        if self.receiver.status(group.name) is not None and not force:
            raise AdminError(f"group {group.name}: its source {group.source} is still connected; "
                             "a planned move is `replicator switchover` on the primary (or force)")
        if group.role != "secondary":
            raise AdminError(f"group {group.name} is {group.role} here; only a secondary is "
                             "promoted")
        replayed = await self._replay_bunker(group, bunker, force)
        result = await self.promote_to(group, targets, force)
        return {**result, "bunker_replay": replayed, "rpo_records": _rpo_records(replayed)}

    async def promote_at(self, group: Group, to: str, targets: list[TargetConfig] | None, *,
                         force: bool) -> dict:
        """Takeover at a point of this secondary's window before a logical corruption
        (group/window.py): the records after it are set aside, not applied, and no bunker
        is asked (what it holds comes after the point)."""
        if self.receiver.status(group.name) is not None:
            raise AdminError(f"group {group.name}: its source {group.source} is still "
                             "connected; stop it first (it would go on shipping what comes "
                             "after the point; --force does not change that)")
        if group.role != "secondary":
            raise AdminError(f"group {group.name} is {group.role} here; only a secondary is "
                             "promoted")
        group.check_promotable(force)  # before anything is undone
        point, kept, path = await group.rewind_to(to)
        result = await self.promote_to(group, targets, force)
        return {**result, "at": point.as_dict(), "kept_records": kept, "kept": path}

    async def rewind_copy(self, group: Group, to: str, directory: str) -> dict:
        """`replicator rewind --copy`: a writable copy at a point of the window, while
        replication goes on."""
        started = time.monotonic()
        try:
            manifest = await snapshot.rewind(group, directory, to)
        except OSError as exc:
            raise AdminError(f"rewind copy of group {group.name} into {directory}: "
                             f"{exc}") from None
        log.warning("group %s: rewound a copy to seq %d into %s", group.name, manifest["seq"],
                    directory)
        return {"group": group.name, "copy": manifest, "seq": manifest["seq"],
                "seconds": round(time.monotonic() - started, 3)}

    async def promote_copy(self, group: Group, directory: str, *, bunker: str | None,
                           force: bool) -> dict:
        """The non-destructive takeover of a DR drill: a snapshot of this replica (which
        goes on replicating), brought forward from the bunker like a promoted replica,
        writable, in its own directory."""
        if group.role != "secondary":
            raise AdminError(f"group {group.name} is {group.role} here; only a secondary's "
                             "copy is promoted")
        started = time.monotonic()
        try:
            snap = await snapshot.take(group, directory)
        except (GroupError, OSError) as exc:
            raise AdminError(f"copy of group {group.name} into {directory}: {exc}") from None
        try:
            replayed = await self._replay_bunker(group, bunker, force, into=snap)
            manifest = await asyncio.get_running_loop().run_in_executor(None, snap.seal)
        except BaseException:
            snap.discard()
            snapshot.remove(directory)
            raise
        log.warning("group %s: promoted a copy at seq %d into %s", group.name, manifest["seq"],
                    directory)
        return {"group": group.name, "role": "copy", "copy": manifest, "seq": manifest["seq"],
                "generation": str(group.lineage.history[-1]) if group.lineage.history else None,
                "bunker_replay": replayed, "rpo_records": _rpo_records(replayed),
                "seconds": round(time.monotonic() - started, 3)}

    async def _replay_bunker(self, group: Group, bunker: str | None, force: bool,
                             into: snapshot.Snapshot | None = None) -> dict | None:
        """Takeover: fetch what the bunker holds past us (or past `into`) before
        promoting."""
        if not bunker:
            return None
        if bunker not in self.cfg.peers:
            raise AdminError(f"group {group.name}: bunker {bunker!r} is not in this node's peers")
        try:
            result = await bunker_replay(group, self.cfg.node, bunker, self.cfg.peers[bunker],
                                         timeout=self.cfg.heartbeat_timeout * 2,
                                         tls=self.credentials.client, into=into)
        except BunkerError as exc:
            if not force:
                raise AdminError(f"{exc}; nothing was promoted. Promote with --no-bunker (or "
                                 "--force) to accept losing what only the bunker holds") from None
            log.error("group %s: %s; promoting anyway (forced)", group.name, exc)
            return {"bunker": bunker, "error": str(exc)}
        log.warning("group %s: replayed %d record(s) (seq %d..%d) from bunker %s", group.name,
                    result["replayed"], result["from_seq"], result["to_seq"], bunker)
        return result

    async def demote(self, group: Group, source: str) -> dict:
        """This node follows `source`, the new primary."""
        if group.role == "secondary":  # done already (maybe by itself, on a later line)
            changed = group.source != source
            if changed:
                await group.reparent(source)
                await self.sync_shippers(group)
            return {"group": group.name, "role": group.role, "source": source,
                    "changed": changed}
        await group.demote(source)
        await self.sync_shippers(group)
        return {"group": group.name, "role": group.role, "source": group.source, "changed": True}

    async def failback(self, group: Group, shipper: Shipper, rejoin_timeout: float,
                       drain_timeout: float) -> dict:
        """After a takeover: wait until the old primary has rejoined as our replica (its
        unshipped writes rolled back, the changed regions resynced), then give the
        primary role back with a switchover."""
        try:
            await asyncio.wait_for(shipper.wait_until(lambda: shipper.phase() == "replicating"),
                                   rejoin_timeout)
        except asyncio.TimeoutError:
            st = shipper.status()
            raise AdminError(f"failback of {group.name}: {shipper.target.node} has not "
                             f"rejoined within {rejoin_timeout:.0f}s (state {st['state']}"
                             + (f": {st['last_error']}" if st["last_error"] else "")
                             + "); still primary here") from None
        rejoin_bytes = shipper.bytes_sent
        result = await self.switchover(group, shipper, drain_timeout)
        return {**result, "rejoin_bytes": rejoin_bytes,
                "volume_bytes": sum(v.size for v in group.volumes.values())}

    async def switchover(self, group: Group, shipper: Shipper, drain_timeout: float) -> dict:
        """Planned move of the primary role to a replicating target: hold new writes,
        drain every connected target, name the new primary to the other targets (their
        source is this node: only it can move them), hand over at the last seq, demote
        here."""
        started = time.monotonic()
        deadline = started + drain_timeout
        group.commit.hold_writes()
        switching = self.receiver.switching[group.name] = \
            asyncio.get_running_loop().create_future()
        told: dict[str, str | None] = {}
        try:
            await group.commit.settle()
            seq = group.journal.last_seq
            streaming = [s for s in self.shippers[group.name] if s.target.streaming]
            await self._drain(group, streaming, seq, deadline, drain_timeout)
            told = await self._name_successor(group, shipper.target.node, seq, deadline)
            targets = [(self.cfg.node, shipper.target.mode, "zstd" if shipper.compress else "none",
                        "continue", shipper.target.cfg.interval)]
            targets += [(t.node, t.mode, t.compress, t.on_disconnect, t.interval)
                        for t in group.target_cfgs if t.node != shipper.target.node]
            try:
                await shipper.handover(seq, tuple(targets), max(1.0, deadline - time.monotonic()))
            except (ShipError, asyncio.TimeoutError) as exc:
                raise AdminError(f"switchover of {group.name} to {shipper.target.node} failed "
                                 f"before the handover: {exc or 'timed out'}; still primary "
                                 "here") from None
            await group.demote(shipper.target.node)
        finally:
            group.commit.release_writes()
            switching.set_result(None)
            if self.receiver.switching.get(group.name) is switching:
                del self.receiver.switching[group.name]
        await self.sync_shippers(group)
        drained = {s.target.node: s.target.acked_seq for s in streaming}
        behind = sorted(n for n, why in told.items() if why)
        for node in behind:
            log.warning("group %s: %s did not hear that %s is its new source (%s): run "
                        "`replicator reparent %s --source %s` on %s", group.name, node,
                        shipper.target.node, told[node], group.name, shipper.target.node, node)
        return {"group": group.name, "from": self.cfg.node, "to": shipper.target.node,
                "seq": seq, "drained": drained, "role": group.role,
                "reparent_needed": behind, "seconds": round(time.monotonic() - started, 3)}

    @staticmethod
    async def _drain(group: Group, streaming: list[Shipper], seq: int, deadline: float,
                     timeout: float) -> None:
        """Until every shipper of `streaming` has its target's ACK of `seq` (durable)."""
        for s in streaming:
            s.flush(seq)
        try:
            await asyncio.wait_for(asyncio.gather(
                *(s.wait_until(lambda s=s: s.target.acked_seq >= seq) for s in streaming)),
                max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            behind = [s.target.node for s in streaming if s.target.acked_seq < seq]
            if behind:  # (none: they all made it as the time ran out)
                raise AdminError(f"switchover of {group.name}: {', '.join(behind)} did not "
                                 f"acknowledge seq {seq} within {timeout:.0f}s; nothing "
                                 "changed") from None

    async def _name_successor(self, group: Group, successor: str, seq: int,
                              deadline: float) -> dict[str, str | None]:
        """Tell every other target (SUCCESSOR) that `successor` takes over after `seq`, so
        that they take it as their source: {node: None when told, else why not}."""
        others = [s for s in self.shippers[group.name] if s.target.node != successor]
        results = await asyncio.gather(
            *(s.name_successor(successor, seq, max(1.0, deadline - time.monotonic()))
              for s in others), return_exceptions=True)
        return {s.target.node: (None if r is None else str(r) or type(r).__name__)
                for s, r in zip(others, results)}

    async def resolve(self, group: Group, survivor: str) -> dict:
        """Split brain, on the loser: take `survivor`'s line; what this node wrote since
        the split is saved (path in status) before the survivor's data replaces it."""
        if group.role == "primary":
            await group.demote(survivor)
            await self.sync_shippers(group)
        group.lineage.survivor = survivor  # resolve: its line wins at the next connect
        group.adopt(group.lineage.history, survivor)
        return {"group": group.name, "role": group.role, "survivor": survivor,
                "split_brain": group.lineage.split_brain}


def _rpo_records(replayed: dict | None) -> int | None:
    """Writes a takeover lost: none after a bunker replay (every write the lost primary
    acknowledged was on its sync bunker first); unknown without one."""
    return 0 if replayed and "error" not in replayed else None
