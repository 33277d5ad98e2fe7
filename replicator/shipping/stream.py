"""The record stream to one target: what has been sent, what waits for its ACK, and the
three loops of a session.

  pump: read durable records after `sent_seq` from the journal (at most BATCH_BYTES a
        frame, at most WINDOW_BYTES unacked) and send them; a heartbeat when idle. It
        also places what rides in the stream at a seq: verify's hash requests, FLUSH,
        RETAIN (bunker), SUCCESSOR and HANDOVER.
  acks: read ACKs and heartbeats; silence longer than heartbeat_timeout ends the session.
  watchdog: records in flight (sent, not acknowledged) and no ACK progress for
        stall_timeout end the session (Stalled), heartbeats or not: a target whose
        acks stopped (a stopped process, whose kernel still takes the bytes; a link
        that drops everything) is reconnected, not waited for.
        A sync target that sends no ACK for sync_ack_timeout while records are in flight
        (its link alive, heartbeats flowing) leaves sync: it goes to logging, so writes
        stop waiting for it, or with on_disconnect: block the writes waiting for it fail
        (EIO) and later ones are held as for any target that is not streaming.
A sync target also gets batches early: once their journal write is done, before their
fdatasync (send_early).

A periodic target gets epochs instead of the continuous stream: at once when a session
starts, then every `interval`, the records from `sent_seq` through the group's last
consistent seq, coalesced (epoch.py), and heartbeats between them. What rides in the
stream goes between epochs only: a verify probe, an order or a flush that needs records
not sent yet ends an epoch early at its seq. Like an async target it is never sent
batches early and never waited for by writes or flushes.

Processing offload (offload/): the stream to a near replica asks it, as the session
begins, to process what it receives for each far target that names it `via`, and hands
the PROCESSED runs it sends back to that target's relay. The stream to such a far
target sends, in seq order, the relay's runs where one begins where the stream is, the
journal's records (direct) elsewhere; a MISMATCH from it (a processed write whose base
it does not hold) switches it to logging, so that a resync repairs the region.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from typing import Callable

from ..group import Group, TargetLink
from ..verify import volume_hashes
from ..offload.relay import Relay
from ..wire import Ack, Flush, Heartbeat, Mismatch, Offload, Processed, Records, Retain
from .epoch import coalesced, epochs
from .peer import Peer, ShipError, ShipTimeout
from .verify import Probe, Verify

BATCH_BYTES = 1 << 20
WINDOW_BYTES = 16 << 20


class Stalled(ShipError):
    """The stall watchdog ended the session: records in flight, no ACK progress for
    stall_timeout."""

    def __init__(self, message: str, backlog_records: int, seconds: float):
        super().__init__(message)
        self.backlog_records, self.seconds = backlog_records, seconds


class _Order:
    """A frame to send once every record through `seq` is sent (SUCCESSOR, HANDOVER);
    done when the target acknowledges exactly `seq`."""
    __slots__ = ("seq", "frame", "done", "sent")

    def __init__(self, seq: int, frame, done: asyncio.Future):
        self.seq, self.frame, self.done, self.sent = seq, frame, done, False


class Stream:
    """What one target has been sent, across sessions, and the loops of the running
    one. Its owner says where to resume (`resume`) and hears of progress through
    `on_caught_up` and `on_ack`."""

    def __init__(self, group: Group, target: TargetLink, *, hb_interval: float,
                 hb_timeout: float, sync_ack_timeout: float, stall_timeout: float,
                 on_caught_up: Callable[[], None], on_ack: Callable[[], None],
                 relays: dict[str, Relay] | None = None):
        self.group, self.target = group, target
        # the group's relays by far target (the agent's, kept current): this target's
        # own if it is a far one, and those whose near node it is
        self.relays = relays if relays is not None else {}
        self.hb_interval, self.hb_timeout = hb_interval, hb_timeout
        self.sync_ack_timeout = sync_ack_timeout
        self.stall_timeout = stall_timeout
        self.on_caught_up = on_caught_up  # the target is in sync: it has all we have
        self.on_ack = on_ack  # the target acknowledged records
        self.sent_seq = 0
        self.bytes_sent = 0
        self.early_batches = 0  # batches shipped before their local fdatasync finished
        self.verifying: Verify | None = None
        self._peer: Peer | None = None  # the session's, while streaming (early batches)
        self._retained_seq = -1  # bunker: the last RETAIN sent in this session
        self._flush_sent = 0  # the last FLUSH sent in this session
        self._flush_asked = 0  # flush() asked this target for durability through this seq
        self._inflight: deque = deque()  # (last_seq, nbytes)
        self._inflight_bytes = 0
        self._ack_wait_since: float | None = None  # the oldest batch in flight waits since
        self._progress_at = 0.0  # the last ACK progress, or the first send after none
        self._in_flight = asyncio.Event()  # set as records go out with none in flight
        self._acked = asyncio.Event()
        self._probes: deque[Probe] = deque()  # verify requests for the pump to place
        self._orders: list[_Order] = []
        self._next_due = 0.0  # periodic: when the next epoch goes (monotonic)
        self.last_epoch: dict | None = None  # periodic: the last epoch sent, for status

    def resume(self, seq: int) -> None:
        """The target holds every record through `seq`: stream from after it."""
        self.sent_seq = seq

    def count(self, nbytes: int) -> None:
        """Payload bytes sent to the target outside the stream (resync)."""
        self.bytes_sent += nbytes

    async def run(self, peer: Peer) -> None:
        """Stream until the session fails (always with an exception)."""
        self._retained_seq = -1
        self._flush_sent = 0
        self._next_due = 0.0  # a session's first epoch goes at once
        near = [r for r in self.relays.values() if r.via == self.target.node]
        relay = self.relays.get(self.target.node) if peer.processed else None
        await self._offload(peer, near, relay)
        pump = asyncio.create_task(self._pump(peer, relay))
        acks = asyncio.create_task(self._acks(peer))
        watchdog = asyncio.create_task(self._watchdog())
        g = self.group
        if self.target.mode == "sync":
            self._peer = peer
            g.commit.early_senders.add(self.send_early)
        elif self.target.mode == "periodic":
            g.commit.durable_listeners.add(self._grown)
        try:
            done, _ = await asyncio.wait({pump, acks, watchdog},
                                         return_when=asyncio.FIRST_COMPLETED)
            # Both may end in one loop turn (the ACK reader makes the target leave sync,
            # which stops the pump): its reason is the one to report, on any event loop.
            for task in (acks, pump, watchdog):
                if task in done:
                    task.result()
        finally:
            for r in near:
                r.processing = False
            g.commit.early_senders.discard(self.send_early)
            g.commit.durable_listeners.discard(self._grown)
            self._peer = None
            for task in (pump, acks, watchdog):
                task.cancel()
            await asyncio.gather(pump, acks, watchdog, return_exceptions=True)

    async def _offload(self, peer: Peer, near: list[Relay], relay: Relay | None) -> None:
        """Before any record of the session: ask the near replica to process for the
        far targets in `near`, and take what it answers; take a far target's MISMATCH."""
        by_far = {r.node: r for r in near}

        def answered(ev: Offload) -> None:
            r = by_far.get(ev.target)
            if r is None:
                raise ShipError(f"{self.target.node} answered OFFLOAD for {ev.target!r}, "
                                "which was not asked")
            r.processing, r.refused = ev.ops == r.ops, ev.reason
            r.near = self.target
            if ev.ops != r.ops:
                self.group.log.warning("group %s: %s will not process for %s: %s",
                                       self.group.name, self.target.node, ev.target,
                                       ev.reason or f"it offers ops {ev.ops:#x} only")

        def processed(ev: Processed) -> None:
            r = by_far.get(ev.target)
            if r is None or not r.processing:
                raise ShipError(f"{self.target.node} sent PROCESSED for {ev.target!r}, "
                                "which it is not processing for")
            r.add(ev.first_seq, ev.last_seq, ev.payload)

        if near:
            peer.handlers.update({Offload: answered, Processed: processed})
            for r in near:
                await peer.send(Offload(target=r.node, ops=int(r.ops)))
        if relay is not None:
            peer.handlers[Mismatch] = lambda ev: self._mismatch(relay, ev)

    def _mismatch(self, relay: Relay, ev: Mismatch) -> None:
        """The far target found another base under the processed write at ev.seq: it
        applied none of it; resync the regions it has not acknowledged (that one too)."""
        t, g = self.target, self.group
        if not t.acked_seq < ev.seq <= self.sent_seq:
            raise ShipError(f"{t.node} reported a base mismatch at seq {ev.seq}, outside "
                            f"{t.acked_seq + 1}..{self.sent_seq}")
        relay.mismatched(ev.seq, ev.volume, ev.offset, ev.length)
        why = (f"base mismatch at seq {ev.seq}: {t.node} does not hold the content the "
               f"processed write to {ev.volume} [{ev.offset}, +{ev.length}) was made "
               "against; not applied, the region is resynced")
        g.log.error("group %s: %s", g.name, why)
        t.in_sync = False
        if not t.logging:
            g.start_logging(t, why)
        g.targets_changed()
        raise ShipError(why, state="logging")

    def ended(self, lost: Exception) -> None:
        """The session is over: nothing is in flight, what waited on it gets `lost`."""
        self._inflight.clear()
        self._inflight_bytes = 0
        self._ack_wait_since = None
        for fut in [p.reply for p in self._probes] + [o.done for o in self._orders]:
            if not fut.done():
                fut.set_exception(lost)
        self._probes.clear()

    def poke(self) -> None:
        """Wake the pump: a verify request is queued, or the target must resync now."""
        self._acked.set()
        self.group.commit.poke_readers()

    def flush(self, seq: int) -> None:
        """Have the target make every record through `seq` durable now."""
        self._flush_asked = max(self._flush_asked, seq)
        self.poke()

    async def order(self, seq: int, frame, timeout: float) -> None:
        """Send `frame` once every record through `seq` is sent; returns when the target
        acknowledges `seq`."""
        o = _Order(seq, frame, asyncio.get_running_loop().create_future())
        self._orders.append(o)
        self.poke()
        try:
            await asyncio.wait_for(o.done, timeout)
        finally:
            self._orders.remove(o)

    async def verify(self, v: Verify) -> dict:
        self.verifying = v
        try:
            return await v.run(self._place, self._withdraw)
        finally:
            self.verifying = None

    def _place(self, probe: Probe) -> None:
        self._probes.append(probe)
        self.poke()

    def _withdraw(self, probe: Probe) -> None:
        if probe in self._probes:
            self._probes.remove(probe)

    def send_early(self, first: int, last: int, bufs: list) -> bool:
        """A batch whose journal write is done, before its fdatasync: ship it now if the
        stream is exactly there (DRBD protocol C overlaps the two the same way). Its
        writes complete once the target acknowledges them written."""
        peer = self._peer
        if (peer is None or self.sent_seq != first - 1 or not self.target.in_sync
                or self._inflight_bytes >= WINDOW_BYTES or self._probes or self.verifying
                or self._orders or not peer.can_post()):
            return False  # the pump sends it from the journal once it is durable
        payload = b"".join(bufs)
        peer.post(Records(first_seq=first, last_seq=last, payload=payload,
                          compress=peer.compress))
        self._sent(last, len(payload))
        self.early_batches += 1
        return True

    async def _pump(self, peer: Peer, relay: Relay | None) -> None:
        g, t = self.group, self.target
        j = g.journal
        last_send = time.monotonic()
        while True:
            self._check(peer)
            if self._probes:
                await self._send_probe(peer, self._probes.popleft())
                last_send = time.monotonic()
                continue
            for o in self._orders:
                if not o.sent and self.sent_seq >= o.seq:
                    o.sent = True
                    await peer.send(o.frame)
            if t.bunker:
                await self._retain(peer)
            periodic = t.mode == "periodic"
            if periodic:
                if await self._epoch_if_due(peer):
                    last_send = time.monotonic()
                    continue
            elif self.sent_seq >= j.last_seq:
                self._caught_up()
            elif self._inflight_bytes < WINDOW_BYTES:
                await self._send_records(peer, relay=relay)
                last_send = time.monotonic()
                continue
            await self._pass_flush(peer)
            wait = max(0.0, self.hb_interval - (time.monotonic() - last_send))
            due_in = self._due_in() if periodic else 0.0
            if periodic and due_in > 0:  # between epochs: until it is due, or poked
                self._acked.clear()
                try:
                    async with asyncio.timeout(min(wait, due_in)):
                        await self._acked.wait()
                except TimeoutError:
                    pass
            elif periodic:  # due early, but not consistent that far yet: until a record comes
                if await g.commit.wait_for_records(j.last_seq, wait):
                    continue
            elif self.sent_seq < j.last_seq:  # window full: wait for an ack
                self._acked.clear()
                try:
                    async with asyncio.timeout(wait or self.hb_interval):
                        await self._acked.wait()
                except TimeoutError:
                    pass
            elif await g.commit.wait_for_records(self.sent_seq, wait):
                continue
            if time.monotonic() - last_send >= self.hb_interval:
                await peer.send(Heartbeat(sent_ns=time.time_ns()))
                last_send = time.monotonic()

    def _check(self, peer: Peer) -> None:
        """End the session when the target may no longer be streamed to."""
        g, t = self.group, self.target
        if t.logging:
            raise ShipError(f"{t.node} switched to logging ({t.why}): "
                            "resync from the bitmap", state="logging")
        if g.lineage.history != peer.history:
            # This node took a new line (a promotion upstream): the target must hear
            # it in a new HELLO, or it would refuse the new primary later.
            raise ShipError(f"generation changed to {g.lineage.history[-1]}: "
                            "reconnecting")

    def _caught_up(self) -> None:
        """The target has all we have (periodic: through the last epoch's seq)."""
        t = self.target
        if not t.in_sync:
            t.in_sync = True
            self.on_caught_up()
            self.group.targets_changed()

    # ---- periodic targets ---------------------------------------------------------------
    def _early(self) -> tuple[int, str] | None:
        """An epoch that must go before its time: (the seq it ends at, why). For the
        first order not sent, or a flush asked for beyond what was sent (a switchover's
        drain waits for both); or when what it would hold passes half of
        logging_high_water: sent early, it keeps the target out of logging (and out of
        the resync after) when an interval's writes are more than the journal keeps."""
        seqs = [o.seq for o in self._orders if not o.sent and o.seq > self.sent_seq]
        if seqs:
            return min(seqs), "order"
        if self._flush_asked > self.sent_seq:
            return self._flush_asked, "flush"
        j = self.group.journal
        if j.bytes_between(self.sent_seq, j.last_seq) > self.group.cfg.logging_high_water // 2:
            return j.last_seq, "backlog"
        return None

    def _grown(self, through: int) -> None:
        """More records are durable: wake the pump if that makes an epoch due early
        (it waits for its time, or a poke, otherwise)."""
        if self._early() is not None:
            self._acked.set()

    def _due_in(self) -> float:
        """Seconds until the next epoch is due (0: now)."""
        if self._early() is not None:
            return 0.0
        return max(0.0, self._next_due - time.monotonic())

    def next_due(self) -> float:
        """When the next epoch is due, as unix time (status)."""
        return time.time() + max(0.0, self._next_due - time.monotonic())

    async def _epoch_if_due(self, peer: Peer) -> bool:
        """Send the epoch through the group's last consistent seq if it is due (through
        an order's seq if one waits); True if one went. Epochs go every `interval`,
        whether the last tick had records to send or not, so that writes after a quiet
        spell are coalesced too; an early one leaves the schedule as it is."""
        if self._due_in() > 0:
            return False
        k, why = self.group.commit.consistent_seq, "interval"
        early = self._early()
        if early is not None:
            k, why = min(k, early[0]), early[1]
        else:
            self._next_due = time.monotonic() + self.target.cfg.interval
        if k <= self.sent_seq:
            self._caught_up()
            return False
        await self._send_epoch(peer, k, why)
        self._caught_up()
        return True

    async def _send_epoch(self, peer: Peer, k: int, why: str) -> None:
        """The records after sent_seq through the consistent seq `k`, as epochs that
        end at every MARKER record on the way (epoch.py epochs()): the target then holds
        the image at each marker exactly, as the primary did."""
        # The first pass reads every header (seconds' worth of writes): off the loop.
        # The journal holds these records until the target acks them.
        parts = await asyncio.to_thread(epochs, self.group.journal.records(self.sent_seq, k))
        for last, skip in parts:
            await self._send_coalesced(peer, last, why if last == k else "marker", skip)

    async def _send_coalesced(self, peer: Peer, k: int, why: str, skip: bytearray) -> None:
        """The records after sent_seq through `k` (an epoch's), coalesced by `skip`, in
        RECORDS frames of at most BATCH_BYTES, within the window; `why` it goes now."""
        j, first = self.group.journal, self.sent_seq + 1
        cut = time.time()
        frame: list = []
        size = before = after = 0
        for rec, bufs in coalesced(j.records(self.sent_seq, k), skip):
            nbytes = sum(len(b) for b in bufs)
            if frame and size + nbytes > BATCH_BYTES:
                await self._send_frame(peer, first, rec.seq - 1, frame)
                frame, size, first = [], 0, rec.seq
            frame += bufs
            size += nbytes
            before += rec.size
            after += nbytes
        await self._send_frame(peer, first, k, frame)
        self.last_epoch = {"seq": k, "time": round(cut, 3), "why": why, "records": len(skip),
                           "skipped": sum(skip), "bytes_before": before,
                           "bytes_after": after}

    async def _send_frame(self, peer: Peer, first: int, last: int, bufs: list) -> None:
        """One RECORDS frame of an epoch, once the window has room for it."""
        while self._inflight_bytes >= WINDOW_BYTES:
            self._check(peer)
            self._acked.clear()
            try:
                async with asyncio.timeout(self.hb_interval):
                    await self._acked.wait()
            except TimeoutError:
                await peer.send(Heartbeat(sent_ns=time.time_ns()))
        payload = b"".join(bufs)
        self._sent(last, len(payload))
        await peer.send(Records(first_seq=first, last_seq=last, payload=payload,
                                compress=peer.compress))
        # A frame of SKIPs stands for thousands of records and fills little of the
        # window: let the loop serve the rest between frames.
        await asyncio.sleep(0)

    async def _pass_flush(self, peer: Peer) -> None:
        """A FLUSH or FUA write here waits for a sync target to make what it was sent
        durable, flush() for any target, and so does a journal that would otherwise
        fill up with what the target has not made durable: ask it to (its ACK says
        when). One FLUSH covers every flush before it."""
        wanted = self._flush_asked
        t, j = self.target, self.group.journal
        if t.mode == "sync":
            wanted = max(wanted, self.group.commit.flush_wanted)
        if t.written_seq > t.acked_seq and \
                j.bytes_between(t.acked_seq, min(t.written_seq, j.last_seq)) > j.capacity // 8:
            # Our journal keeps what it has not made durable: ask before that fills it
            # (a target commits on its own only every commit_interval).
            wanted = max(wanted, t.written_seq)
        seq = min(wanted, self.sent_seq)
        if seq > self._flush_sent and seq > t.acked_seq:
            self._flush_sent = seq
            await peer.send(Flush(seq=seq))

    async def _retain(self, peer: Peer) -> None:
        """Tell the bunker how far every other target got: it keeps the records after."""
        far = min(self.group.retention.far_seq(), self.sent_seq)
        if far != self._retained_seq:
            await peer.send(Retain(seq=far))
            self._retained_seq = far

    async def _send_records(self, peer: Peer, through: int | None = None,
                            relay: Relay | None = None) -> None:
        """The next RECORDS frame (through `through` at most); for a relayed far target,
        the relay's run that begins here instead, if it has one (or gets one soon)."""
        seq, j = self.sent_seq + 1, self.group.journal
        if relay is not None:
            if await relay.wait_for(seq) and self.sent_seq + 1 == seq:
                if relay.last_of(seq) > j.last_seq:  # not durable here yet: an async
                    # target never gets records this node may still lose
                    await self.group.commit.wait_for_records(j.last_seq, self.hb_interval)
                    return
                limit = j.last_seq if through is None else min(through, j.last_seq)
                if relay.last_of(seq) <= limit:
                    last, payloads = relay.take(seq, limit, BATCH_BYTES)
                    payload = b"".join(payloads)
                    self._sent(last, len(payload))
                    self._path(relay.shipped(last - seq + 1, True, len(payload),
                                             j.bytes_between(seq - 1, last)), relay)
                    await peer.send(Processed(target=self.target.node, first_seq=seq,
                                              last_seq=last, payload=payload))
                    return
            start = relay.next_start(seq)
            if start is not None:
                through = start - 1 if through is None else min(through, start - 1)
        first, last, data = self.group.journal.read(seq, BATCH_BYTES, through)
        frame = Records(first_seq=first, last_seq=last, payload=data, compress=peer.compress)
        self._sent(last, len(data))  # before the await: an early batch must follow it
        if relay is not None:
            self._path(relay.shipped(last - first + 1, False, len(data), len(data)), relay)
            relay.drop_through(last)
        await peer.send(frame)

    def _path(self, changed: str | None, relay: Relay) -> None:
        if changed is not None:
            g = self.group
            g.log.warning("group %s -> %s: records now go %s%s", g.name, self.target.node,
                          changed, f" ({relay.why_direct()})" if changed == "direct" else "")

    def _sent(self, last: int, nbytes: int) -> None:
        if not self._inflight:
            self._ack_wait_since = self._progress_at = time.monotonic()
            self._in_flight.set()
        self.sent_seq = last
        self.bytes_sent += nbytes
        self._inflight.append((last, nbytes))
        self._inflight_bytes += nbytes

    async def _send_probe(self, peer: Peer, probe: Probe) -> None:
        """Place a verify HASH_REQUEST in the stream: our regions are read now, at the
        group's last consistent seq (the loop applies each batch to the volumes as it
        indexes it, so the two agree; a replica applies an epoch when its last record
        is in); RECORDS through that seq go first, later ones after."""
        g = self.group
        # batches shipped early, not durable yet; or records of an epoch still coming in
        while g.commit.consistent_seq < self.sent_seq:
            if g.commit.halted:  # that batch will never be durable here
                raise ShipError(f"group {g.name}: {g.commit.halted}")
            await g.commit.wait_for_records(g.journal.last_seq, self.hb_interval)
        seq = g.commit.consistent_seq
        await g.apply_through(seq)  # (a deferred secondary applies in steps)
        if g.commit.applied_seq != seq or g.inconsistent:
            probe.reply.set_exception(ShipError(f"group {g.name} on this node is not a "
                                                "consistent image right now"))
            return
        probe.seq = seq
        probe.hashes = volume_hashes(g.volumes[probe.volume], probe.offset, probe.length,
                                     g.cfg.bitmap_granularity)
        if self.target.mode == "periodic" and self.sent_seq < seq:
            await self._send_epoch(peer, seq, "verify")  # consistent: the volumes hold it
        while self.sent_seq < seq:
            await self._send_records(peer, seq, self.relays.get(self.target.node)
                                     if peer.processed else None)
        await peer.request_hashes(probe.reply, seq, probe.volume, probe.offset, probe.length)

    async def _acks(self, peer: Peer) -> None:
        sync = self.target.mode == "sync"
        while True:
            timeout, ack_due = self.hb_timeout, False
            if sync and self._ack_wait_since is not None:
                left = self._ack_wait_since + self.sync_ack_timeout - time.monotonic()
                if left <= 0:
                    self._left_sync()
                timeout, ack_due = min(timeout, left), left < timeout
            try:
                ev = await peer.next_reply(timeout, "streaming")
            except ShipTimeout:
                # (not time.monotonic() again: the loop's clock may run a millisecond
                # behind it, uvloop's does, so the wait can end just short of the due time)
                if ack_due:
                    self._left_sync()
                raise
            if isinstance(ev, Ack):
                self._ack(ev)
            elif ev is not None:
                raise ShipError(f"unexpected {type(ev).__name__} from {self.target.node} "
                                "while streaming")

    def _ack(self, ev: Ack) -> None:
        t = self.target
        if not (t.written_seq <= ev.seq <= self.sent_seq
                and t.acked_seq <= ev.durable <= ev.seq):
            raise ShipError(f"{t.node} acked seq {ev.seq} (durable {ev.durable}) "
                            f"outside {t.written_seq}..{self.sent_seq} (durable from "
                            f"{t.acked_seq})")
        if ev.seq > t.written_seq:
            self._progress_at = time.monotonic()
        t.acked(ev.seq, ev.durable)
        relay = self.relays.get(t.node)
        if relay is not None:
            relay.drop_through(ev.seq)
        for o in self._orders:  # the target did as told
            if o.sent and ev.seq == o.seq and not o.done.done():
                o.done.set_result(None)
        while self._inflight and self._inflight[0][0] <= ev.seq:
            self._inflight_bytes -= self._inflight.popleft()[1]
            # the next batch's wait for its ACK starts now, not when it was sent
            self._ack_wait_since = time.monotonic() if self._inflight else None
        self._acked.set()
        self.group.targets_changed()
        self.on_ack()

    async def _watchdog(self) -> None:
        """The stall watchdog: end the session (Stalled) once records are in flight
        and the target's ACKs have not moved for stall_timeout. Its own loop: the ACK
        reader sleeps until a frame comes or heartbeat_timeout, and a stalled target
        may send neither. A target acks per RECORDS frame, so stall_timeout must be
        longer than one frame (BATCH_BYTES) takes over the slowest link."""
        while True:
            if not self._inflight:
                self._in_flight.clear()
                await self._in_flight.wait()
                continue
            left = self._progress_at + self.stall_timeout - time.monotonic()
            if left <= 0:
                self._stalled()
            await asyncio.sleep(left)

    def _stalled(self) -> None:
        """Records are in flight and the target acknowledged none of them for
        stall_timeout: end the session (the shipper counts it and reconnects)."""
        t = self.target
        waited = time.monotonic() - self._progress_at
        backlog = self.group.journal.last_seq - t.written_seq
        raise Stalled(f"{t.node} stalled: no ACK progress for {waited:.1f}s (stall_timeout "
                      f"{self.stall_timeout:g}s) with seq {t.written_seq + 1}..{self.sent_seq} "
                      f"in flight ({backlog} record(s) behind): reconnecting",
                      backlog, waited)

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
