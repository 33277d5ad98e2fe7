"""Per-target sender: ships a group's journal to one target, FIFO, from the target's
own position, and keeps the target's TargetLink (acked seq, in-sync) current.

One session = connect, HELLO/WELCOME, then two loops until either fails:
  pump: read durable records after `sent_seq` from the journal (at most BATCH_BYTES a
        frame, at most WINDOW_BYTES unacked) and send them; a heartbeat when idle.
  acks: read ACKs and heartbeats; silence longer than heartbeat_timeout ends the session.
        A sync target that sends no ACK for sync_ack_timeout while records are in flight
        (its link alive, heartbeats flowing) leaves sync: it goes to logging, so writes
        stop waiting for it, or with on_disconnect: block the writes waiting for it fail
        (EIO) and later ones are held as for any target that is not streaming.
Between sessions the shipper backs off (0.1 s doubling to RECONNECT_MAX, each wait
jittered) and reconnects; it always resumes from the position the target reports in
WELCOME, so nothing is skipped and nothing is applied twice. The cap is short so that a
target that restarts is streamed to within a second of listening: an attempt on a peer
whose agent is down costs a SYN and its RST (two to four a second per target), and one on a
dead WAN peer waits out its connect timeout (heartbeat_timeout) first, so it cannot spin.
A target that refuses us (split brain, stale, needs-resync, TLS) waits REFUSED_BACKOFF:
that takes an operator, not a retry.

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
import errno
import itertools
import logging
import random
import ssl
import time
from collections import deque

from .generations import Generation, Relation, compare
from .group import Group, TargetLink, wake_all
from .journal.segments import JournalError
from .transport import Link
from .verify import CHUNK, chunks, differing, volume_hashes
from .wire import (ANY_SEQ, PROTOCOL_MAX, PROTOCOL_MIN, Ack, Connection, ConnectionClosed,
                   Diverged, Error, Feature, Flush, Handover, HashReply, HashRequest, Heartbeat,
                   Hello, LocalProtocolError, Records, Refusal, Refuse, RemoteProtocolError,
                   ResyncAck, ResyncBegin, ResyncData, ResyncDone, Retain, Role, Successor,
                   Welcome, code_name)

BATCH_BYTES = 1 << 20
WINDOW_BYTES = 16 << 20
RESYNC_WINDOW = 8 << 20
HASH_DEPTH = 8  # HASH_REQUESTs in flight (verify, checksum resync)
STREAMING_STATES = ("replicating", "catching-up")
RECONNECT_MIN, RECONNECT_MAX = 0.1, 0.5  # seconds between connects to a target that is away
REFUSED_BACKOFF = 5.0  # seconds after a target refused the session


class _Probe:
    """One verify HASH_REQUEST: the regions, our hashes of them at `seq`, the answer."""
    __slots__ = ("volume", "offset", "length", "seq", "hashes", "reply")

    def __init__(self, volume: str, offset: int, length: int, reply: asyncio.Future):
        self.volume, self.offset, self.length, self.reply = volume, offset, length, reply
        self.seq, self.hashes = 0, b""


def _runs(regions, most: int):
    """Dirty regions (volume, region, offset, length) grouped into runs of at most
    `most` consecutive regions of one volume."""
    run: list = []
    for r in regions:
        if run and (r[0] != run[-1][0] or r[1] != run[-1][1] + 1 or len(run) == most):
            yield run
            run = []
        run.append(r)
    if run:
        yield run


class ShipError(Exception):
    """A session with a target ended for a reason worth reporting."""

    def __init__(self, message: str, state: str = "connecting"):
        super().__init__(message)
        self.state = state


class Shipper:
    def __init__(self, group: Group, link: TargetLink, *, node: str,
                 address: tuple[str, int], compress: bool, heartbeat_interval: float,
                 heartbeat_timeout: float, sync_ack_timeout: float = 10.0,
                 initial_sync: str = "full",
                 tls: ssl.SSLContext | None = None, log: logging.Logger | None = None):
        self.group = group
        self.target = link
        self.node = node
        self.address = address
        self.tls = tls
        self.compress = compress  # configured; compress_now: agreed for this session
        self.compress_now = False
        self.hb_interval = heartbeat_interval
        self.hb_timeout = heartbeat_timeout
        self.sync_ack_timeout = sync_ack_timeout
        self.log = log or logging.getLogger(f"replicator.ship.{group.name}.{link.node}")
        self.state = "connecting"
        self.last_error = ""
        self.sent_seq = 0
        self.retained_seq = -1  # bunker: the last RETAIN sent in this session
        self._flush_sent = 0  # the last FLUSH sent in this session
        self._flush_asked = 0  # flush() asked this target for durability through this seq
        self._link: Link | None = None  # the stream, for early batches (sync targets)
        self.early_batches = 0  # batches shipped before their local fdatasync finished
        self.bytes_sent = 0
        self._inflight: deque = deque()  # (last_seq, nbytes)
        self._inflight_bytes = 0
        self._ack_wait_since: float | None = None  # the oldest batch in flight waits since
        self._acked = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._needs_resync = False
        self.resync_rate = group.cfg.resync_rate  # bytes/s, 0 = unlimited; runtime-settable
        self.resync: dict | None = None  # progress of the running resync
        self.initial_sync = initial_sync  # full | checksum | none, for a new target
        self.verifying: dict | None = None  # progress of the running verify
        self._probes: deque[_Probe] = deque()  # verify requests for the pump to place
        self._hash_ids = itertools.count(1)
        self._hash_waiters: dict[int, asyncio.Future] = {}
        self._resync_waiters: list[asyncio.Future] = []
        self._handover: dict | None = None  # switchover: {seq, targets, fut, sent}
        self._successor: dict | None = None  # switchover: {seq, node, fut, sent}
        self._stopping = False
        self._hello_history: list = []  # the history this session's HELLO carried

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"ship-{self.group.name}-{self.target.node}")

    async def stop(self) -> None:
        self._stopping = True
        # Cancel until it is done: asyncio.wait_for (Python 3.11) can swallow a
        # cancellation that lands as its inner await completes.
        while self._task and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
        self._disconnected()

    async def _run(self) -> None:
        backoff = RECONNECT_MIN
        while not self._stopping:
            link, wait = None, 0.0
            try:
                link = await self._connect()
                backoff = RECONNECT_MIN
                await self._stream(link)
            except (OSError, asyncio.TimeoutError, ShipError, LocalProtocolError,
                    RemoteProtocolError, JournalError) as exc:
                state = exc.state if isinstance(exc, ShipError) else "connecting"
                msg = str(exc) or type(exc).__name__
                if msg != self.last_error or state != self.state:
                    self.log.warning("group %s -> %s: %s", self.group.name, self.target.node, msg)
                self.last_error, self.state = msg, state
                if state in ("refused", "needs-resync", "split-brain", "stale"):
                    wait = REFUSED_BACKOFF
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not end the shipper silently
                self.log.exception("group %s -> %s: the shipper failed", self.group.name,
                                   self.target.node)
                self.last_error = f"internal error: {type(exc).__name__}: {exc}"
                self.state, wait = "failed", REFUSED_BACKOFF  # said loudly, then tried again
            finally:
                self._disconnected()
                if link is not None:
                    await link.close()
            # Jittered (half to all of it) so that the shippers of many groups to one
            # target do not all knock at once.
            await asyncio.sleep(wait or backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, RECONNECT_MAX)

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
        self._ack_wait_since = None
        lost = ShipError(f"the link to {self.target.node} went down"
                         + (f": {self.last_error}" if self.last_error else ""))
        waiters = list(self._hash_waiters.values()) + [p.reply for p in self._probes]
        waiters += [h["fut"] for h in (self._handover, self._successor) if h]
        for fut in waiters:
            if not fut.done():
                fut.set_exception(lost)
        self._hash_waiters.clear()
        self._probes.clear()

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
            g = self.group
            self._hello_history = list(g.lineage.history)
            # Everything we may have shipped before (early, to a sync target) is durable
            # and in the journal, so a target is never ahead of the seq we name.
            await g.commit.commit_now()
            await link.send(Hello(proto_min=PROTOCOL_MIN, proto_max=PROTOCOL_MAX,
                                  features=features, node=self.node, group=g.name,
                                  target=self.target.node, seq=g.journal.last_seq,
                                  history=tuple((x.id, x.first_seq) for x in g.lineage.history)))
            ev = await link.next_event(self.hb_timeout)
            if isinstance(ev, Refuse):
                state = {Refusal.SPLIT_BRAIN: "split-brain", Refusal.STALE: "stale"}.get(
                    ev.code, "refused")
                if state == "split-brain":
                    g.lineage.diverged(self.target.node, reason=ev.reason)
                # stale: the target follows a later primary. That is no reason to stop
                # being primary here (a peer's claim is no authority): the operator
                # demotes this node (replicator demote) once it knows who took over.
                raise ShipError(f"refused by {self.target.node}: {code_name(ev.code)}: "
                                f"{ev.reason}",
                                state=state)
            if not isinstance(ev, Welcome):
                raise ShipError(f"{self.target.node} closed the connection during the handshake")
            if ev.node != self.target.node:
                raise ShipError(f"{host}:{port} answered as {ev.node!r}, expected "
                                f"{self.target.node!r} (peers address book wrong?)", state="refused")
            verdict = compare(g.lineage.history, g.journal.last_seq,
                              [Generation(*x) for x in ev.history], ev.seq)
            if verdict.relation in (Relation.DIVERGED, Relation.SPLIT_BRAIN):
                # (split brain accepted: the target was told we are the survivor)
                diverged = await link.next_event(self.hb_timeout)
                while isinstance(diverged, Heartbeat):  # it is saving what it rolls back
                    diverged = await link.next_event(self.hb_timeout)
                if not isinstance(diverged, Diverged):
                    raise ShipError(f"{self.target.node} sent {type(diverged).__name__}, "
                                    "expected DIVERGED")
                self._rejoin(diverged)
            else:
                self._resume_from(ev)
            g.lineage.reconciled(self.target.node)
            self.compress_now = self.compress and bool(ev.features & Feature.ZSTD)
        except BaseException:
            await link.close()
            raise
        return link

    def _rejoin(self, ev: Diverged) -> None:
        """The target holds records past `fork` that our line does not have (it was the
        primary of a takeover, or ahead of the replica promoted): resync the regions
        written on either side since the fork, which rolls its records back."""
        t = self.target
        t.connected = True
        self.last_error = ""
        self.group.request_rejoin(t, ev.fork, ev.extents if ev.complete else None)
        self._needs_resync = True
        self.state = "resyncing"

    def _resume_from(self, welcome: Welcome) -> None:
        j, t = self.group.journal, self.target
        if welcome.seq > j.last_seq and self.group.unclean_start:
            # We went down uncleanly and our journal lost records it had shipped (the
            # page cache of a power loss): never flushed here, so nobody was promised
            # them. The target follows our image: a checksum resync rolls them back.
            self.log.warning("group %s -> %s: %s holds seq %d..%d, which this node lost "
                             "when it went down (never flushed): rolled back by a checksum "
                             "resync", self.group.name, t.node, t.node, j.last_seq + 1,
                             welcome.seq)
            t.reset_position(j.last_seq)  # what it acked past that is gone here too
            self._rejoin(Diverged(fork=j.last_seq, complete=False))
            return
        if welcome.seq > j.last_seq:
            raise ShipError(f"{t.node} is at seq {welcome.seq}, ahead of this node "
                            f"({j.last_seq}): it has writes we do not", state="needs-resync")
        ours = j.position(welcome.seq)
        if ours is not None and ours.hcrc != welcome.crc:
            raise ShipError(f"{t.node} diverged: its record {welcome.seq} differs "
                            "from ours", state="needs-resync")
        t.connected = True
        self.last_error = ""
        if not t.synced and not t.logging and welcome.seq == 0:
            mode = "clean" if self.initial_sync == "none" else self.initial_sync
            self.group.request_resync(t, mode, "initial sync of a new target", initial=True)
        self._needs_resync = t.logging or ours is None or welcome.seq < t.acked_seq
        if not self._needs_resync:
            self.sent_seq = welcome.seq
            t.reset_position(welcome.seq)
            self.state = "catching-up"
            self.group.targets_changed()
            self.log.info("group %s -> %s: streaming from seq %d", self.group.name,
                          t.node, welcome.seq + 1)
            return
        if not t.logging or welcome.seq < t.acked_seq:
            why = (f"the journal no longer holds its position {welcome.seq}" if ours is None
                   else f"it is at seq {welcome.seq}, behind its acknowledged {t.acked_seq}")
            # Its image is consistent at its seq: only regions that differ need to move.
            self.group.request_resync(t, "checksum", why)
        self.state = "resyncing"

    async def _stream(self, link: Link) -> None:
        self.retained_seq = -1
        self._flush_sent = 0
        if self._needs_resync:
            await self._resync(link)
        pump = asyncio.create_task(self._pump(link))
        acks = asyncio.create_task(self._acks(link))
        g = self.group
        if self.target.mode == "sync":
            self._link = link
            g.commit.early_senders.add(self._send_early)
        try:
            done, _ = await asyncio.wait({pump, acks}, return_when=asyncio.FIRST_COMPLETED)
            # Both may end in one loop turn (the ACK reader makes the target leave sync,
            # which stops the pump): its reason is the one to report, on any event loop.
            for task in (acks, pump):
                if task in done:
                    task.result()
        finally:
            g.commit.early_senders.discard(self._send_early)
            self._link = None
            for task in (pump, acks):
                task.cancel()
            await asyncio.gather(pump, acks, return_exceptions=True)

    def _send_early(self, first: int, last: int, bufs: list) -> bool:
        """A batch whose journal write is done, before its fdatasync: ship it now if the
        stream is exactly there (DRBD protocol C overlaps the two the same way). Its
        writes complete once the target acknowledges them written."""
        link = self._link
        if (link is None or link.writer.is_closing() or self.sent_seq != first - 1
                or not self.target.in_sync
                or self._inflight_bytes >= WINDOW_BYTES or self._probes or self.verifying
                or self._handover or link.writer.transport.get_write_buffer_size()):
            return False  # the pump sends it from the journal once it is durable
        payload = b"".join(bufs)
        link.post(Records(first_seq=first, last_seq=last, payload=payload,
                          compress=self.compress_now))
        self._sent(last, len(payload))
        self.early_batches += 1
        return True

    async def _pump(self, link: Link) -> None:
        j = self.group.journal
        last_send = time.monotonic()
        while True:
            if self.target.logging:
                raise ShipError(f"{self.target.node} switched to logging ({self.target.why}): "
                                "resync from the bitmap", state="logging")
            if self.group.lineage.history != self._hello_history:
                # This node took a new line (a promotion upstream): the target must hear
                # it in a new HELLO, or it would refuse the new primary later.
                raise ShipError(f"generation changed to {self.group.lineage.history[-1]}: "
                                "reconnecting")
            if self._probes:
                await self._send_probe(link, self._probes.popleft())
                last_send = time.monotonic()
                continue
            h = self._successor
            if h and not h["sent"] and self.sent_seq >= h["seq"]:
                h["sent"] = True
                await link.send(Successor(seq=h["seq"], node=h["node"]))
            h = self._handover
            if h and not h["sent"] and self.sent_seq >= h["seq"]:
                await link.send(Handover(seq=h["seq"], targets=h["targets"]))
                h["sent"] = True
            if self.target.bunker:
                await self._retain(link)
            if self.sent_seq >= j.last_seq and not self.target.in_sync:
                self.target.in_sync = True
                self.state = "replicating"
                self.group.targets_changed()
            if self.sent_seq < j.last_seq and self._inflight_bytes < WINDOW_BYTES:
                await self._send_records(link)
                last_send = time.monotonic()
                continue
            await self._pass_flush(link)
            wait = max(0.0, self.hb_interval - (time.monotonic() - last_send))
            if self.sent_seq < j.last_seq:  # window full: wait for an ack
                self._acked.clear()
                try:
                    async with asyncio.timeout(wait or self.hb_interval):
                        await self._acked.wait()
                except TimeoutError:
                    pass
            elif await self.group.commit.wait_for_records(self.sent_seq, wait):
                continue
            if time.monotonic() - last_send >= self.hb_interval:
                await link.send(Heartbeat(sent_ns=time.time_ns()))
                last_send = time.monotonic()

    def flush(self, seq: int) -> None:
        """Have the target make every record through `seq` durable now (a switchover
        waits for that), instead of within its commit_interval."""
        self._flush_asked = max(self._flush_asked, seq)
        self.poke()

    async def _pass_flush(self, link: Link) -> None:
        """A FLUSH or FUA write here waits for a sync target to make what it was sent
        durable, flush() for any target, and so does a journal that would otherwise
        fill up with what the target has not made durable: ask it to (its ACK says
        when). One FLUSH covers every flush before it."""
        wanted = self._flush_asked
        if self.target.mode == "sync":
            wanted = max(wanted, self.group.commit.flush_wanted)
        t, j = self.target, self.group.journal
        if t.written_seq > t.acked_seq and \
                j.bytes_between(t.acked_seq, min(t.written_seq, j.last_seq)) > j.capacity // 8:
            # Our journal keeps what it has not made durable: ask before that fills it
            # (a target commits on its own only every commit_interval).
            wanted = max(wanted, t.written_seq)
        seq = min(wanted, self.sent_seq)
        if seq > self._flush_sent and seq > self.target.acked_seq:
            self._flush_sent = seq
            await link.send(Flush(seq=seq))

    async def _retain(self, link: Link) -> None:
        """Tell the bunker how far every other target got: it keeps the records after."""
        far = min(self.group.retention.far_seq(), self.sent_seq)
        if far != self.retained_seq:
            await link.send(Retain(seq=far))
            self.retained_seq = far

    async def _send_records(self, link: Link, through: int | None = None) -> None:
        first, last, data = self.group.journal.read(self.sent_seq + 1, BATCH_BYTES, through)
        frame = Records(first_seq=first, last_seq=last, payload=data, compress=self.compress_now)
        self._sent(last, len(data))  # before the await: an early batch must follow it
        await link.send(frame)

    def _sent(self, last: int, nbytes: int) -> None:
        if not self._inflight:
            self._ack_wait_since = time.monotonic()
        self.sent_seq = last
        self.bytes_sent += nbytes
        self._inflight.append((last, nbytes))
        self._inflight_bytes += nbytes

    async def _send_probe(self, link: Link, probe: _Probe) -> None:
        """Place a verify HASH_REQUEST in the stream: our regions are read now, at the
        journal's last seq (the loop applies each batch to the volumes as it indexes
        it, so the two agree); RECORDS through that seq go first, later ones after."""
        g = self.group
        while g.journal.last_seq < self.sent_seq:  # batches shipped early, not durable yet
            if g.commit.halted:  # that batch will never be durable here
                raise ShipError(f"group {g.name}: {g.commit.halted}")
            await g.commit.wait_for_records(g.journal.last_seq, self.hb_interval)
        seq = g.journal.last_seq
        if g.commit.applied_seq != seq or g.inconsistent:
            probe.reply.set_exception(ShipError(f"group {g.name} on this node is not a "
                                                "consistent image right now"))
            return
        probe.seq = seq
        probe.hashes = volume_hashes(g.volumes[probe.volume], probe.offset, probe.length,
                                     g.cfg.bitmap_granularity)
        while self.sent_seq < seq:
            await self._send_records(link, seq)
        await self._request_hashes(link, probe.reply, seq, probe.volume, probe.offset,
                                   probe.length)

    async def _request_hashes(self, link: Link, reply: asyncio.Future, seq: int, volume: str,
                              offset: int, length: int) -> None:
        req = HashRequest(id=next(self._hash_ids), seq=seq, volume=volume, offset=offset,
                          length=length, granularity=self.group.cfg.bitmap_granularity)
        self._hash_waiters[req.id] = reply
        await link.send(req)

    def _hash_reply(self, ev: HashReply) -> None:
        fut = self._hash_waiters.pop(ev.id, None)
        if fut is None:
            raise ShipError(f"{self.target.node} answered hash request {ev.id}, which is not "
                            "outstanding")
        if not fut.done():
            fut.set_result(ev)

    def poke(self) -> None:
        """Wake the pump: a verify request is queued, or the target must resync now."""
        self._acked.set()
        self.group.commit.poke_readers()

    async def _acks(self, link: Link) -> None:
        sync = self.target.mode == "sync"
        while True:
            timeout, ack_due = self.hb_timeout, False
            if sync and self._ack_wait_since is not None:
                left = self._ack_wait_since + self.sync_ack_timeout - time.monotonic()
                if left <= 0:
                    self._left_sync()
                timeout, ack_due = min(timeout, left), left < timeout
            try:
                ev = await link.next_event(timeout)
            except TimeoutError:
                # (not time.monotonic() again: the loop's clock may run a millisecond
                # behind it, uvloop's does, so the wait can end just short of the due time)
                if ack_due:
                    self._left_sync()
                raise
            if isinstance(ev, Ack):
                t = self.target
                if not (t.written_seq <= ev.seq <= self.sent_seq
                        and t.acked_seq <= ev.durable <= ev.seq):
                    raise ShipError(f"{t.node} acked seq {ev.seq} (durable {ev.durable}) "
                                    f"outside {t.written_seq}..{self.sent_seq} (durable from "
                                    f"{t.acked_seq})")
                t.acked(ev.seq, ev.durable)
                for h in (self._handover, self._successor):  # the target did as told
                    if h and h["sent"] and ev.seq == h["seq"] and not h["fut"].done():
                        h["fut"].set_result(None)
                while self._inflight and self._inflight[0][0] <= ev.seq:
                    self._inflight_bytes -= self._inflight.popleft()[1]
                    # the next batch's wait for its ACK starts now, not when it was sent
                    self._ack_wait_since = time.monotonic() if self._inflight else None
                self._acked.set()
                self.group.targets_changed()
            elif isinstance(ev, HashReply):
                self._hash_reply(ev)
            elif isinstance(ev, Error):
                raise ShipError(f"{self.target.node} reported error {code_name(ev.code)}: "
                                f"{ev.message}")
            elif isinstance(ev, ConnectionClosed):
                raise ShipError(f"{self.target.node} closed the connection")
            elif not isinstance(ev, Heartbeat):
                raise ShipError(f"unexpected {type(ev).__name__} from {self.target.node}")

    def _left_sync(self) -> None:
        """The sync target has acknowledged nothing for sync_ack_timeout though records
        are in flight: stop making writes wait for it, say so, and end the session (the
        next one resyncs it from its bitmap)."""
        t, g = self.target, self.group
        waited = time.monotonic() - self._ack_wait_since
        why = (f"no ACK for seq {t.acked_seq + 1}..{self.sent_seq} in {waited:.1f}s "
               f"(sync_ack_timeout {self.sync_ack_timeout:g}s) while the link was up")
        outcome = "writes no longer wait for it"
        if t.block:  # first: once it is out of sync nothing would hold these back
            failed = g.commit.fail_sync_waits(t, errno.EIO)
            outcome = (f"{failed} write(s) waiting for it failed (EIO) and new ones wait "
                       "until it is back (on_disconnect: block)")
        t.in_sync = False
        if not t.logging:
            g.start_logging(t, why)
        g.targets_changed()
        raise ShipError(f"{t.node} left sync: {why}; {outcome}", state="logging")

    # ---- resync ---------------------------------------------------------------------------
    async def _resync(self, link: Link) -> None:
        g, t = self.group, self.target
        bm = t.bitmap
        gran = g.cfg.bitmap_granularity
        pending: deque = deque()  # (volume, region, length) sent, not yet durable
        progress = self.resync = {"done_bytes": 0, "total_bytes": 0, "same_bytes": 0,
                                  "started": time.monotonic(), "passes": 0}
        state = {"acked": 0, "sent": 0, "pending_bytes": 0, "done_seq": None, "error": None}
        wake = asyncio.Event()
        rate = {"tokens": 0.0, "last": time.monotonic()}

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
                    elif isinstance(ev, HashReply):
                        self._hash_reply(ev)
                    elif isinstance(ev, Ack):
                        state["done_seq"] = ev.seq
                    elif isinstance(ev, Error):
                        raise ShipError(f"{t.node} reported error {code_name(ev.code)}: "
                                        f"{ev.message}")
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

        async def send(volume: str, region: int, offset: int, data) -> None:
            """RESYNC_DATA for one region, inside the window and the rate limit."""
            await wait(lambda: state["pending_bytes"] < RESYNC_WINDOW)
            await link.send(ResyncData(volume=volume, offset=offset, payload=bytes(data)))
            pending.append((volume, region, len(data)))
            state["pending_bytes"] += len(data)
            state["sent"] += 1
            self.bytes_sent += len(data)
            if self.resync_rate:
                now = time.monotonic()
                rate["tokens"] = min(self.resync_rate,
                                     rate["tokens"] + (now - rate["last"]) * self.resync_rate)
                rate["last"] = now
                rate["tokens"] -= len(data)
                if rate["tokens"] < 0:
                    await asyncio.sleep(-rate["tokens"] / self.resync_rate)

        async def settle(run, ours, reply) -> None:
            """A checksum answer is in: send the regions whose hashes differ (as they are
            now: a write since the hashing marks them again), clear the rest."""
            await wait(reply.done)
            theirs = reply.result().hashes
            if len(theirs) != len(ours):
                raise ShipError(f"{t.node} returned {len(theirs)} bytes of hashes for "
                                f"{len(ours)}")
            diff = set(differing(ours, theirs))
            for i, (volume, region, offset, length) in enumerate(run):
                if i in diff:
                    await send(volume, region, offset, g.volumes[volume].read(offset, length))
                elif bm.clear(volume, region):
                    progress["done_bytes"] += length
                    progress["same_bytes"] += length

        reader = asyncio.create_task(read_acks())
        loop = asyncio.get_running_loop()
        begun = None  # the seq the running pass's RESYNC_BEGIN named (None: no pass yet)

        async def begin(seq: int) -> None:
            nonlocal begun
            if seq != begun:
                await link.send(ResyncBegin(seq=seq))
                begun = seq

        try:
            epoch, first = None, True
            while True:
                if epoch != t.resync_epoch:  # (re)started, maybe in another mode
                    epoch, first = t.resync_epoch, True
                if g.commit.volume_error:  # the volumes lack journaled records: no image to send
                    await wait(lambda: not g.commit.volume_error)
                g.mark_bitmap(t)
                if t.bunker:  # journal only: it restarts at our position, no regions
                    bm.clear_all()
                bm.remarked = set()
                regions = list(bm.dirty())
                if regions:
                    await begin(bm.through)
                if not regions:
                    if g.inconsistent:
                        # This node is itself being resynced: it has no image to finish
                        # on; what its own resync writes gets marked meanwhile.
                        await wait(lambda: not g.inconsistent or bm.count())
                        continue
                    bm.remarked = None
                    t.finishing = True  # the checkpointer must not move `through` any more
                    seq = bm.through
                    await begin(seq)
                    await link.send(ResyncDone(seq=seq, crc=g.journal.position(seq).hcrc))
                    await wait(lambda: state["done_seq"] is not None)
                    t.finishing = False
                    begun = None  # the pass is over: another one announces itself
                    if state["done_seq"] != seq:
                        raise ShipError(f"{t.node} finished the resync at seq "
                                        f"{state['done_seq']}, expected {seq}")
                    if not bm.count() and not g.inconsistent:
                        break
                    # Regions were marked while the target finished (this node's own
                    # resync began): the target holds our image at seq; go on from there.
                    state["done_seq"] = None
                    continue
                # The first pass goes as asked; later ones only carry regions written
                # during it, which differ for sure.
                mode = t.resync_mode if first else "full"
                first = False
                progress.update(mode=t.resync_mode, initial=t.resync_initial)
                progress["passes"] += 1
                progress["total_bytes"] = progress["done_bytes"] + sum(r[3] for r in regions)
                if mode == "checksum":
                    probes: deque = deque()
                    for run in _runs(regions, CHUNK // gran or 1):
                        if epoch != t.resync_epoch:
                            break
                        volume, offset = run[0][0], run[0][2]
                        length = sum(r[3] for r in run)
                        ours = volume_hashes(g.volumes[volume], offset, length, gran)
                        reply = loop.create_future()
                        await self._request_hashes(link, reply, ANY_SEQ, volume, offset, length)
                        probes.append((run, ours, reply))
                        if len(probes) >= HASH_DEPTH:
                            await settle(*probes.popleft())
                    while probes:
                        await settle(*probes.popleft())
                else:
                    for volume, region, offset, length in regions:
                        if epoch != t.resync_epoch:
                            break
                        await send(volume, region, offset, g.volumes[volume].read(offset, length))
                await wait(lambda: not pending)
            g.stop_logging(t, seq)
            self.sent_seq = seq
            self._needs_resync = False
            self.state = "catching-up"
            for vol in g.volumes.values():
                vol.forget()  # what the passes read
            self.log.info("group %s -> %s: %s resync complete at seq %d (%d bytes checked, %d "
                          "sent, %d pass(es) in %.3fs); streaming from seq %d", g.name, t.node,
                          progress.get("mode", "full"), seq, progress["done_bytes"],
                          progress["done_bytes"] - progress["same_bytes"], progress["passes"],
                          time.monotonic() - progress["started"], seq + 1)
            wake_all(self._resync_waiters)
        finally:
            t.finishing = False
            bm.remarked = None
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self.resync = None

    # ---- switchover -----------------------------------------------------------------------
    async def handover(self, seq: int, targets: tuple, timeout: float) -> None:
        """Make the target the primary at `seq` (every record through it sent first):
        returns when it says it is."""
        if not (self.target.streaming and self.state in STREAMING_STATES):
            raise ShipError(f"{self.target.node} is {self._state()}: a switchover needs it "
                            "replicating")
        fut = asyncio.get_running_loop().create_future()
        self._handover = {"seq": seq, "targets": targets, "fut": fut, "sent": False}
        self.poke()
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._handover = None

    async def name_successor(self, node: str, seq: int, timeout: float) -> None:
        """Tell the target (SUCCESSOR) that `node` becomes its source after `seq` (every
        record through it sent first): returns when it says it heard."""
        if not (self.target.streaming and self.state in STREAMING_STATES):
            raise ShipError(f"{self.target.node} is {self._state()}")
        fut = asyncio.get_running_loop().create_future()
        self._successor = {"seq": seq, "node": node, "fut": fut, "sent": False}
        self.poke()
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._successor = None

    # ---- online verify -----------------------------------------------------------------
    async def verify(self, ranges: list[tuple[str, int, int | None]]) -> dict:
        """Compare the hashes of every region of `ranges` (volume, offset, length or
        None for the rest of the volume) on the target with ours, in-band: each chunk is
        hashed here at some seq and on the target after exactly that seq."""
        t, g = self.target, self.group
        if t.bunker:
            raise ShipError(f"{t.node} is a bunker: it holds no volumes to verify (every "
                            "record it keeps is checksummed)")
        if not (t.streaming and self.state in STREAMING_STATES):
            raise ShipError(f"{t.node} is {self._state()}: verify needs a target that is "
                            "replicating")
        if self.verifying is not None:
            raise ShipError(f"a verify of {t.node} is already running")
        gran = g.cfg.bitmap_granularity
        pieces = [(volume, off, n) for volume, offset, length in ranges
                  for off, n in chunks(g.volumes[volume].size, gran, offset, length)]
        p = self.verifying = {"done_bytes": 0, "total_bytes": sum(n for *_, n in pieces),
                              "mismatches": 0, "started": time.monotonic()}
        loop = asyncio.get_running_loop()
        mismatches: list[dict] = []
        seqs: list[int] = []
        inflight: deque[_Probe] = deque()

        async def settle(probe: _Probe) -> None:
            reply = await probe.reply
            ours = probe.hashes
            if len(reply.hashes) != len(ours) or reply.seq != probe.seq:
                raise ShipError(f"{t.node} answered a hash request for seq {probe.seq} with "
                                f"{len(reply.hashes)} bytes at seq {reply.seq}")
            for i in differing(ours, reply.hashes):
                offset = probe.offset + i * gran
                mismatches.append({"volume": probe.volume, "offset": offset,
                                   "length": min(gran, probe.offset + probe.length - offset)})
            p["done_bytes"] += probe.length
            p["mismatches"] = len(mismatches)
            seqs.append(probe.seq)

        try:
            for piece in pieces:
                probe = _Probe(*piece, loop.create_future())
                self._probes.append(probe)
                self.poke()
                inflight.append(probe)
                if len(inflight) >= HASH_DEPTH:
                    await settle(inflight.popleft())
            while inflight:
                await settle(inflight.popleft())
        finally:
            self.verifying = None
            for volume in {piece[0] for piece in pieces}:
                g.volumes[volume].forget()
            for probe in inflight:
                if probe in self._probes:
                    self._probes.remove(probe)
        seconds = time.monotonic() - p["started"]
        self.log.info("group %s -> %s: verified %d bytes at seq %s..%s in %.1fs: %d "
                      "mismatching region(s)", g.name, t.node, p["done_bytes"],
                      min(seqs, default=None), max(seqs, default=None), seconds, len(mismatches))
        return {"group": g.name, "target": t.node, "bytes_checked": p["done_bytes"],
                "regions_checked": sum(-(-n // gran) for *_, n in pieces),
                "first_seq": min(seqs, default=None), "last_seq": max(seqs, default=None),
                "seconds": round(seconds, 3), "mismatches": mismatches}

    async def repair(self, mismatches: list[dict]) -> dict:
        """Resync exactly the regions verify found different (and anything else the target
        has not acknowledged); returns when the target streams again."""
        g, t = self.group, self.target
        regions = [(m["volume"], m["offset"], m["length"]) for m in mismatches]
        done = asyncio.get_running_loop().create_future()
        self._resync_waiters.append(done)
        g.mark_for_repair(t, regions)
        self.poke()
        await done
        return {"regions": len(regions), "bytes": sum(r[2] for r in regions)}

    def _resync_status(self) -> dict | None:
        p = self.resync
        if p is None:
            return None
        elapsed = max(1e-6, time.monotonic() - p["started"])
        rate = p["done_bytes"] / elapsed
        left = p["total_bytes"] - p["done_bytes"]
        return {"done_bytes": p["done_bytes"], "total_bytes": p["total_bytes"],
                "same_bytes": p["same_bytes"], "mode": p.get("mode", self.target.resync_mode),
                "initial": p.get("initial", self.target.resync_initial),
                "rate_bytes_per_s": round(rate), "passes": p["passes"],
                "eta_seconds": round(left / rate, 1) if rate > 0 else None,
                "rate_limit_bytes_per_s": self.resync_rate}

    def _verify_status(self) -> dict | None:
        p = self.verifying
        if p is None:
            return None
        rate = p["done_bytes"] / max(1e-6, time.monotonic() - p["started"])
        return {"done_bytes": p["done_bytes"], "total_bytes": p["total_bytes"],
                "mismatches": p["mismatches"], "rate_bytes_per_s": round(rate),
                "eta_seconds": round((p["total_bytes"] - p["done_bytes"]) / rate, 1) if rate else None}

    def _state(self) -> str:
        if self.target.logging and self.state not in ("resyncing", "refused", "needs-resync",
                                                      "split-brain", "stale"):
            return "logging"
        if self.verifying is not None and self.state in STREAMING_STATES:
            return "verifying"
        return self.state

    def status(self) -> dict:
        records, nbytes, seconds = self.group.lag(self.target)
        return {
            "node": self.target.node,
            "address": f"{self.address[0]}:{self.address[1]}",
            "mode": self.target.mode,
            "compress": "zstd" if self.compress else "none",
            "state": self._state(),
            "in_sync": self.target.in_sync,
            **({"bunker": True, "far_lag_records": {
                n: max(0, self.target.acked_seq - o.acked_seq)
                for n, o in self.group.targets.items() if n != self.target.node and not o.bunker}}
               if self.target.bunker else {}),
            "on_disconnect": "block" if self.target.block else "continue",
            "dirty_bytes": self.target.bitmap.dirty_bytes() if self.target.logging else 0,
            "resync": self._resync_status(),
            "verify": self._verify_status(),
            "acked_seq": self.target.acked_seq,
            "written_seq": self.target.written_seq,
            "durable_seq": self.target.acked_seq,
            "sent_seq": self.sent_seq,
            "lag_records": records,
            "lag_bytes": nbytes,
            "lag_seconds": round(seconds, 3),
            "bytes_sent": self.bytes_sent,
            "early_batches": self.early_batches,
            "last_error": self.last_error,
        }
