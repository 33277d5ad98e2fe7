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
of us, or at a seq whose record differs from ours, or behind what the journal still
holds, is not streamed to (state `needs-resync`; resync is a later feature).
"""

from __future__ import annotations

import asyncio
import ssl
import logging
import time
from collections import deque

from .group import Group, TargetLink
from .transport import Link
from .wire import (PROTOCOL_MAX, PROTOCOL_MIN, Ack, Connection, ConnectionClosed, Error,
                   Feature, Heartbeat, Hello, LocalProtocolError, Records, Refuse,
                   RemoteProtocolError, Role, Welcome)

BATCH_BYTES = 1 << 20
WINDOW_BYTES = 16 << 20


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
        if self.target.in_sync:
            self.target.in_sync = False
            self.group.targets_changed()
        if self.state in ("replicating", "catching-up"):
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
        j = self.group.journal
        if welcome.seq > j.last_seq:
            raise ShipError(f"{self.target.node} is at seq {welcome.seq}, ahead of this node "
                            f"({j.last_seq}): it has writes we do not", state="needs-resync")
        ours = j.position(welcome.seq)
        if ours is None:
            raise ShipError(f"{self.target.node} is at seq {welcome.seq}; the journal only "
                            f"holds {j.first_seq}..{j.last_seq}", state="needs-resync")
        if ours.hcrc != welcome.crc:
            raise ShipError(f"{self.target.node} diverged: its record {welcome.seq} differs "
                            "from ours", state="needs-resync")
        self.sent_seq = welcome.seq
        self.target.acked_seq = welcome.seq
        self.state = "catching-up"
        self.last_error = ""
        self.log.info("group %s -> %s: streaming from seq %d", self.group.name,
                      self.target.node, welcome.seq + 1)

    async def _stream(self, link: Link) -> None:
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

    def status(self) -> dict:
        records, nbytes, seconds = self.group.lag(self.target.acked_seq)
        return {
            "node": self.target.node,
            "address": f"{self.address[0]}:{self.address[1]}",
            "mode": self.target.mode,
            "compress": "zstd" if self.compress else "none",
            "state": self.state,
            "in_sync": self.target.in_sync,
            "acked_seq": self.target.acked_seq,
            "sent_seq": self.sent_seq,
            "lag_records": records,
            "lag_bytes": nbytes,
            "lag_seconds": round(seconds, 3),
            "bytes_sent": self.bytes_sent,
            "last_error": self.last_error,
        }
