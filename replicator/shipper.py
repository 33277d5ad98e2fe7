"""Per-target sender: ships a group's journal to one target, FIFO, from the target's
own position, and keeps the target's TargetLink (acked seq, in-sync) current.

One session = connect, HELLO/WELCOME, then two loops until either fails:
  pump: read durable records after `sent_seq` from the journal (at most BATCH_BYTES a
        frame, at most WINDOW_BYTES unacked) and send them; a heartbeat when idle.
  acks: read ACKs and heartbeats; silence longer than heartbeat_timeout ends the session.
Between sessions the shipper backs off (0.1 s doubling to 5 s) and reconnects; it always
resumes from the position the target reports in WELCOME, so nothing is skipped and
nothing is applied twice.

Before streaming, the target's position is checked against the journal: a target ahead
of us, or at a seq whose record differs from ours, is not streamed to (state
`needs-resync`: its history diverged from ours).

Resync: a target in logging (its bitmap, not the journal, covers what it lacks), or one
whose position the journal no longer holds (a new target: every region is marked), is
first resynced. A pass marks the journal through its end into the bitmap and sends the
current content of every dirty region (RESYNC_DATA, at most resync_rate bytes/s and
RESYNC_WINDOW unacknowledged); a region's bit is cleared when the target reports it
durable, unless it was written again meanwhile. Passes repeat until the bitmap is clean;
then RESYNC_DONE(seq) puts the target at the bitmap's `through`, and journal streaming
resumes at seq + 1. Bits cleared are saved with the bitmap every checkpoint, so a resync
interrupted by either side resumes where it was instead of starting over.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque

from .group import Group, TargetLink
from .transport import Link
from .wire import (PROTOCOL_MAX, PROTOCOL_MIN, Ack, Connection, ConnectionClosed, Error,
                   Feature, Heartbeat, Hello, LocalProtocolError, Records, Refuse,
                   RemoteProtocolError, ResyncAck, ResyncData, ResyncDone, Role, Welcome)

BATCH_BYTES = 1 << 20
WINDOW_BYTES = 16 << 20
RESYNC_WINDOW = 8 << 20


class ShipError(Exception):
    """A session with a target ended for a reason worth reporting."""

    def __init__(self, message: str, state: str = "connecting"):
        super().__init__(message)
        self.state = state


class Shipper:
    def __init__(self, group: Group, link: TargetLink, *, node: str,
                 address: tuple[str, int], compress: bool, heartbeat_interval: float,
                 heartbeat_timeout: float, tls: ssl.SSLContext | None = None,
                 log: logging.Logger | None = None):
        self.group = group
        self.target = link
        self.node = node
        self.address = address
        self.tls = tls
        self.compress = compress  # configured; compress_now: agreed for this session
        self.compress_now = False
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.log = log or logging.getLogger(f"replicator.ship.{group.name}.{link.node}")
        self.state = "connecting"
        self.last_error = ""
        self.sent_seq = 0
        self.bytes_sent = 0
        self._inflight: deque = deque()  # (last_seq, nbytes)
        self._inflight_bytes = 0
        self._acked = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._needs_resync = False
        self.resync_rate = group.cfg.resync_rate  # bytes/s, 0 = unlimited; runtime-settable
        self.resync: dict | None = None  # progress of the running resync

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"ship-{self.group.name}-{self.target.node}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._disconnected()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            link = None
            try:
                link = await self._connect()
                backoff = 0.1
                await self._stream(link)
            except (OSError, asyncio.TimeoutError, ShipError, LocalProtocolError,
                    RemoteProtocolError) as exc:
                state = exc.state if isinstance(exc, ShipError) else "connecting"
                msg = str(exc) or type(exc).__name__
                if msg != self.last_error or state != self.state:
                    self.log.warning("group %s -> %s: %s", self.group.name, self.target.node, msg)
                self.last_error, self.state = msg, state
                if state != "connecting":
                    backoff = 5.0
            finally:
                self._disconnected()
                if link is not None:
                    await link.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _disconnected(self) -> None:
        if self.target.connected:
            self.target.connected = False
            self.target.disconnected_at = time.monotonic()
        self.resync = None
        if self.target.in_sync:
            self.target.in_sync = False
            self.group.targets_changed()
        if self.state in ("replicating", "catching-up", "resyncing"):
            self.state = "connecting"
        self._inflight.clear()
        self._inflight_bytes = 0

    async def _connect(self) -> Link:
        host, port = self.address
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self.tls,
                                        server_hostname=self.target.node if self.tls else None),
                self.hb_timeout)
        except ssl.SSLError as exc:
            raise ShipError(f"TLS with {self.target.node} at {host}:{port} failed: "
                            f"{getattr(exc, 'verify_message', None) or exc.reason or exc}",
                            state="refused") from None
        link = Link(reader, writer, Connection(Role.SENDER))
        try:
            features = Feature.ZSTD if self.compress else Feature(0)
            await link.send(Hello(proto_min=PROTOCOL_MIN, proto_max=PROTOCOL_MAX,
                                  features=features, node=self.node,
                                  group=self.group.name, target=self.target.node))
            ev = await link.next_event(self.hb_timeout)
            if isinstance(ev, Refuse):
                raise ShipError(f"refused by {self.target.node}: {ev.code.name}: {ev.reason}",
                                state="refused")
            if not isinstance(ev, Welcome):
                raise ShipError(f"{self.target.node} closed the connection during the handshake")
            if ev.node != self.target.node:
                raise ShipError(f"{host}:{port} answered as {ev.node!r}, expected "
                                f"{self.target.node!r} (peers address book wrong?)", state="refused")
            self._resume_from(ev)
            self.compress_now = self.compress and bool(ev.features & Feature.ZSTD)
        except BaseException:
            await link.close()
            raise
        return link

    def _resume_from(self, welcome: Welcome) -> None:
        j, t = self.group.journal, self.target
        if welcome.seq > j.last_seq:
            raise ShipError(f"{t.node} is at seq {welcome.seq}, ahead of this node "
                            f"({j.last_seq}): it has writes we do not", state="needs-resync")
        ours = j.position(welcome.seq)
        if ours is not None and ours.hcrc != welcome.crc:
            raise ShipError(f"{t.node} diverged: its record {welcome.seq} differs "
                            "from ours", state="needs-resync")
        t.connected = True
        self.last_error = ""
        self._needs_resync = t.logging or ours is None or welcome.seq < t.acked_seq
        if not self._needs_resync:
            self.sent_seq = welcome.seq
            t.acked_seq = welcome.seq
            self.state = "catching-up"
            self.log.info("group %s -> %s: streaming from seq %d", self.group.name,
                          t.node, welcome.seq + 1)
            return
        if not t.logging or welcome.seq < t.acked_seq:
            why = (f"the journal no longer holds its position {welcome.seq}" if ours is None
                   else f"it is at seq {welcome.seq}, behind its acknowledged {t.acked_seq}")
            self.log.warning("group %s -> %s: full resync: %s", self.group.name, t.node, why)
            self.group.start_full_resync(t)
        self.state = "resyncing"

    async def _stream(self, link: Link) -> None:
        if self._needs_resync:
            await self._resync(link)
        pump = asyncio.create_task(self._pump(link))
        acks = asyncio.create_task(self._acks(link))
        try:
            done, _ = await asyncio.wait({pump, acks}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in (pump, acks):
                task.cancel()
            await asyncio.gather(pump, acks, return_exceptions=True)

    async def _pump(self, link: Link) -> None:
        j = self.group.journal
        last_send = time.monotonic()
        while True:
            if self.target.logging:
                raise ShipError(f"{self.target.node} fell behind by more than "
                                "logging_high_water: resync from the bitmap", state="logging")
            if self.sent_seq >= j.last_seq and not self.target.in_sync:
                self.target.in_sync = True
                self.state = "replicating"
                self.group.targets_changed()
            if self.sent_seq < j.last_seq and self._inflight_bytes < WINDOW_BYTES:
                first, last, data = j.read(self.sent_seq + 1, BATCH_BYTES)
                await link.send(Records(first_seq=first, last_seq=last, payload=data,
                                        compress=self.compress_now))
                self.sent_seq = last
                self.bytes_sent += len(data)
                self._inflight.append((last, len(data)))
                self._inflight_bytes += len(data)
                last_send = time.monotonic()
                continue
            wait = max(0.0, self.hb_interval - (time.monotonic() - last_send))
            if self.sent_seq < j.last_seq:  # window full: wait for an ack
                self._acked.clear()
                try:
                    await asyncio.wait_for(self._acked.wait(), wait or self.hb_interval)
                except asyncio.TimeoutError:
                    pass
            elif await self.group.wait_for_records(self.sent_seq, wait):
                continue
            if time.monotonic() - last_send >= self.hb_interval:
                await link.send(Heartbeat(sent_ns=time.time_ns()))
                last_send = time.monotonic()

    async def _acks(self, link: Link) -> None:
        while True:
            ev = await link.next_event(self.hb_timeout)
            if isinstance(ev, Ack):
                if not self.target.acked_seq <= ev.seq <= self.sent_seq:
                    raise ShipError(f"{self.target.node} acked seq {ev.seq} outside "
                                    f"{self.target.acked_seq}..{self.sent_seq}")
                self.target.acked_seq = ev.seq
                while self._inflight and self._inflight[0][0] <= ev.seq:
                    self._inflight_bytes -= self._inflight.popleft()[1]
                self._acked.set()
                self.group.targets_changed()
            elif isinstance(ev, Error):
                raise ShipError(f"{self.target.node} reported error {ev.code.name}: {ev.message}")
            elif isinstance(ev, ConnectionClosed):
                raise ShipError(f"{self.target.node} closed the connection")
            elif not isinstance(ev, Heartbeat):
                raise ShipError(f"unexpected {type(ev).__name__} from {self.target.node}")

    # ---- resync ---------------------------------------------------------------------------
    async def _resync(self, link: Link) -> None:
        g, t = self.group, self.target
        bm = t.bitmap
        pending: deque = deque()  # (volume, region, length) sent, not yet durable
        progress = self.resync = {"done_bytes": 0, "total_bytes": 0, "started": time.monotonic(),
                                  "passes": 0}
        state = {"acked": 0, "sent": 0, "pending_bytes": 0, "done_seq": None, "error": None}
        wake = asyncio.Event()

        async def read_acks():
            try:
                while True:
                    ev = await link.next_event(self.hb_timeout)
                    if isinstance(ev, ResyncAck):
                        if not state["acked"] <= ev.count <= state["sent"]:
                            raise ShipError(f"{t.node} acknowledged {ev.count} resync regions "
                                            f"of {state['sent']} sent")
                        for _ in range(ev.count - state["acked"]):
                            volume, region, length = pending.popleft()
                            bm.clear(volume, region)
                            progress["done_bytes"] += length
                            state["pending_bytes"] -= length
                        state["acked"] = ev.count
                    elif isinstance(ev, Ack):
                        state["done_seq"] = ev.seq
                    elif isinstance(ev, Error):
                        raise ShipError(f"{t.node} reported error {ev.code.name}: {ev.message}")
                    elif isinstance(ev, ConnectionClosed):
                        raise ShipError(f"{t.node} closed the connection during the resync")
                    wake.set()
            except BaseException as exc:
                state["error"] = exc
                wake.set()
                raise

        async def wait(condition) -> None:
            while not condition():
                if state["error"] is not None:
                    raise state["error"]
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), self.hb_interval)
                except asyncio.TimeoutError:
                    await link.send(Heartbeat(sent_ns=time.time_ns()))

        reader = asyncio.create_task(read_acks())
        try:
            while True:
                g.mark_bitmap(t)
                bm.remarked = set()
                regions = list(bm.dirty())
                if not regions:
                    break
                progress["passes"] += 1
                progress["total_bytes"] = progress["done_bytes"] + sum(r[3] for r in regions)
                tokens, last = 0.0, time.monotonic()
                for volume, region, offset, length in regions:
                    await wait(lambda: state["pending_bytes"] < RESYNC_WINDOW)
                    data = g.volumes[volume].read(offset, length)
                    await link.send(ResyncData(volume=volume, offset=offset, payload=data))
                    pending.append((volume, region, length))
                    state["pending_bytes"] += length
                    state["sent"] += 1
                    self.bytes_sent += length
                    if self.resync_rate:
                        now = time.monotonic()
                        tokens = min(self.resync_rate, tokens + (now - last) * self.resync_rate)
                        last = now
                        tokens -= length
                        if tokens < 0:
                            await asyncio.sleep(-tokens / self.resync_rate)
                await wait(lambda: not pending)
            bm.remarked = None
            seq = bm.through
            t.finishing = True  # the checkpointer must not move `through` any more
            pos = g.journal.position(seq)
            await link.send(ResyncDone(seq=seq, crc=pos.hcrc))
            await wait(lambda: state["done_seq"] is not None)
            if state["done_seq"] != seq:
                raise ShipError(f"{t.node} finished the resync at seq {state['done_seq']}, "
                                f"expected {seq}")
            g.stop_logging(t, seq)
            self.sent_seq = seq
            self._needs_resync = False
            self.state = "catching-up"
            self.log.info("group %s -> %s: resync complete at seq %d (%d bytes, %d pass(es)); "
                          "streaming from seq %d", g.name, t.node, seq, progress["done_bytes"],
                          progress["passes"], seq + 1)
        finally:
            t.finishing = False
            bm.remarked = None
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self.resync = None

    def _resync_status(self) -> dict | None:
        p = self.resync
        if p is None:
            return None
        elapsed = max(1e-6, time.monotonic() - p["started"])
        rate = p["done_bytes"] / elapsed
        left = p["total_bytes"] - p["done_bytes"]
        return {"done_bytes": p["done_bytes"], "total_bytes": p["total_bytes"],
                "rate_bytes_per_s": round(rate), "passes": p["passes"],
                "eta_seconds": round(left / rate, 1) if rate > 0 else None,
                "rate_limit_bytes_per_s": self.resync_rate}

    def status(self) -> dict:
        records, nbytes, seconds = self.group.lag(self.target.acked_seq)
        return {
            "node": self.target.node,
            "address": f"{self.address[0]}:{self.address[1]}",
            "mode": self.target.mode,
            "compress": "zstd" if self.compress else "none",
            "state": ("logging" if self.target.logging and self.state != "resyncing"
                      else self.state),
            "in_sync": self.target.in_sync,
            "dirty_bytes": self.target.bitmap.dirty_bytes() if self.target.logging else 0,
            "resync": self._resync_status(),
            "acked_seq": self.target.acked_seq,
            "sent_seq": self.sent_seq,
            "lag_records": records,
            "lag_bytes": nbytes,
            "lag_seconds": round(seconds, 3),
            "bytes_sent": self.bytes_sent,
            "last_error": self.last_error,
        }
