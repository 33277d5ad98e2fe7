"""The agent: composes groups, their shippers, the replication listener, the NBD server
and the admin socket for one node, and runs them until SIGTERM/SIGINT.

Start order: every group recovers (journal scan, replay onto volumes) before anything
listens, so no client ever sees a volume that is not yet consistent. Stop order is the
reverse: stop accepting, stop shipping, finish queued writes, checkpoint, close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from .admin import AdminError, AdminServer
from .capture.export import VolumeExport
from .capture.nbd import NbdServer
from .config import Config
from .group import Group, GroupError
from .receiver import Receiver
from .shipper import Shipper, ShipError
from .transport import tls_contexts

NBD_MAX_REQUEST = 4 << 20
log = logging.getLogger("replicator.agent")


class Agent:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.groups = {g.name: Group(g, cfg.state_dir) for g in cfg.groups}
        self.shippers: dict[str, list[Shipper]] = {}
        self.exports: dict[str, VolumeExport] = {}
        self.server_tls, self.client_tls = tls_contexts(cfg.tls)
        self.receiver = Receiver(cfg.node, self.groups, heartbeat_timeout=cfg.heartbeat_timeout,
                                 tls=self.server_tls)
        self.nbd = NbdServer(lambda: self.exports, max_request=NBD_MAX_REQUEST)
        self.admin = AdminServer(cfg.admin_socket, {"status": self._status,
                                                    "rollback": self._rollback,
                                                    "resync": self._resync,
                                                    "verify": self._verify})
        self.started = time.time()

    async def start(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        for group in self.groups.values():
            group.logging_after = self.cfg.heartbeat_timeout
            group.open()
            group.start()
            self.exports.update({name: VolumeExport(group, vol)
                                 for name, vol in group.volumes.items()})
            self.shippers[group.name] = [
                Shipper(group, group.targets[t.node], node=self.cfg.node,
                        address=self.cfg.peers[t.node], compress=t.compress == "zstd",
                        heartbeat_interval=self.cfg.heartbeat_interval,
                        heartbeat_timeout=self.cfg.heartbeat_timeout,
                        initial_sync=t.initial_sync, tls=self.client_tls)
                for t in group.cfg.targets]
        await self.receiver.start(*self.cfg.listen)
        await self.nbd.start(*self.cfg.nbd_listen)
        await self.admin.start()
        for shippers in self.shippers.values():
            for shipper in shippers:
                shipper.start()
        log.info("node %s up: replication on %s:%d, NBD on %s:%d, %d group(s)",
                 self.cfg.node, *self.cfg.listen, *self.cfg.nbd_listen, len(self.groups))

    async def stop(self) -> None:
        await self.admin.close()
        await self.nbd.close()
        await self.receiver.close()
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
            "groups": [self._group_status(g) for g in self.groups.values()
                       if wanted in (None, g.name)],
        }

    def _group(self, request: dict) -> Group:
        name = request.get("group")
        if name not in self.groups:
            raise AdminError(f"no group {name!r} on node {self.cfg.node} "
                             f"(groups: {', '.join(self.groups) or 'none'})")
        return self.groups[name]

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
        try:
            restored = await group.rollback()
        except GroupError as exc:
            raise AdminError(str(exc)) from None
        return {"group": group.name, "regions_restored": restored,
                "consistent_seq": group.journal.last_seq}

    async def _resync(self, request: dict) -> dict:
        """Tune a target's resync rate, and/or start a resync of it: `full`, `checksum`
        or `clean` (declare it identical: nothing is sent but later writes)."""
        group = self._group(request)
        shipper = self._shipper(group, request.get("target"))
        rate, mode = request.get("rate"), request.get("mode")
        if rate is not None:
            shipper.resync_rate = int(rate)
        if mode is not None:
            if mode not in ("full", "checksum", "clean"):
                raise AdminError(f"resync mode {mode!r}: expected full, checksum or clean")
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
            "source": group.cfg.source,
            "upstream": self.receiver.status(group.name),
            "seq": j.last_seq,
            "applied_seq": group.applied_seq,
            "checkpoint_seq": group.checkpoint.seq,
            "inconsistent": group.inconsistent,
            "writes_blocked_by": group.blocked_by,
            "consistent_seq": group.resync_base.seq if group.inconsistent else group.applied_seq,
            "journal": {"first_seq": j.first_seq, "used_bytes": j.used_bytes,
                        "capacity_bytes": j.capacity, "full": group.journal_full},
            "volumes": [{"name": v.name, "path": v.path, "size": v.size}
                        for v in group.volumes.values()],
            "targets": [s.status() for s in self.shippers.get(group.name, [])],
        }


async def run(cfg: Config) -> int:
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    await stop.wait()
    log.info("signal received, shutting down")
    await agent.stop()
    return 0
