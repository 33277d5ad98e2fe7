"""The sender side of a resync: bring a target to this node's image from the bitmap.

A target in logging (its bitmap, not the journal, covers what it lacks), or one whose
position the journal no longer holds (a new target: every region is marked), is first
resynced. A pass marks the journal through its end into the bitmap and sends the
current content of every dirty region (RESYNC_DATA, at most the rate limit in bytes/s
and RESYNC_WINDOW unacknowledged); a region's bit is cleared when the target reports it
durable, unless it was written again meanwhile. A checksum pass first asks the target
for its hashes of runs of dirty regions and sends only those that differ. Passes repeat
until the bitmap is clean; then RESYNC_DONE(seq) puts the target at the bitmap's
`through`, and journal streaming resumes at seq + 1. Bits cleared are saved with the
bitmap every checkpoint, so a resync interrupted by either side resumes where it was
instead of starting over.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from ..group import Group, TargetLink
from ..verify import CHUNK, differing, volume_hashes
from ..wire import ANY_SEQ, Ack, Heartbeat, ResyncAck, ResyncBegin, ResyncData, ResyncDone
from .peer import Peer, ShipError

RESYNC_WINDOW = 8 << 20
HASH_DEPTH = 8  # HASH_REQUESTs in flight (verify, checksum resync)


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


class Resync:
    """One resync of one target over one session: its passes, the regions in flight and
    its progress. `run()` returns the seq the target holds our image at."""

    def __init__(self, group: Group, target: TargetLink, peer: Peer, *, hb_interval: float,
                 hb_timeout: float, rate_limit: Callable[[], int],
                 on_sent: Callable[[int], None]):
        self.group, self.target, self.peer = group, target, peer
        self.hb_interval, self.hb_timeout = hb_interval, hb_timeout
        self.rate_limit = rate_limit  # bytes/s, 0 = unlimited (the operator may change it)
        self.on_sent = on_sent  # payload bytes sent, for the shipper's counter
        self.gran = group.cfg.bitmap_granularity
        self.pending: deque = deque()  # (volume, region, length) sent, not yet durable
        self.pending_bytes = 0
        self.sent = self.acked = 0  # RESYNC_DATA frames sent, and acknowledged by the target
        self.done_seq: int | None = None  # the seq the target's ACK of RESYNC_DONE named
        self.error: BaseException | None = None  # what ended the ACK reader
        self.begun: int | None = None  # the seq the running pass's RESYNC_BEGIN named
        self._wake = asyncio.Event()
        self._tokens, self._refilled = 0.0, time.monotonic()
        # progress, for status
        self.mode: str | None = None
        self.initial: bool | None = None
        self.passes = self.done_bytes = self.total_bytes = self.same_bytes = 0
        self.started = time.monotonic()

    def status(self) -> dict:
        elapsed = max(1e-6, time.monotonic() - self.started)
        rate = self.done_bytes / elapsed
        left = self.total_bytes - self.done_bytes
        return {"done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "same_bytes": self.same_bytes,
                "mode": self.mode if self.mode is not None else self.target.resync_mode,
                "initial": self.initial if self.initial is not None
                else self.target.resync_initial,
                "rate_bytes_per_s": round(rate), "passes": self.passes,
                "eta_seconds": round(left / rate, 1) if rate > 0 else None,
                "rate_limit_bytes_per_s": self.rate_limit()}

    async def run(self) -> int:
        g, t = self.group, self.target
        bm = t.bitmap
        reader = asyncio.create_task(self._read_acks())
        try:
            epoch, first = None, True
            while True:
                if epoch != t.resync_epoch:  # (re)started, maybe in another mode
                    epoch, first = t.resync_epoch, True
                if g.commit.volume_error:  # the volumes lack journaled records: no image to send
                    await self._wait(lambda: not g.commit.volume_error)
                g.mark_bitmap(t)
                if t.bunker:  # journal only: it restarts at our position, no regions
                    bm.clear_all()
                bm.begin_pass()
                regions = list(bm.dirty())
                if regions:
                    await self._begin(bm.through)
                    await self._pass(regions, t.resync_mode if first else "full", epoch)
                    # The first pass goes as asked; later ones only carry regions written
                    # during it, which differ for sure.
                    first = False
                    continue
                if g.inconsistent:
                    # This node is itself being resynced: it has no image to finish on;
                    # what its own resync writes gets marked meanwhile.
                    await self._wait(lambda: not g.inconsistent or bm.count())
                    continue
                seq = await self._finish()
                if not bm.count() and not g.inconsistent:
                    break
                # Regions were marked while the target finished (this node's own resync
                # began): the target holds our image at seq; go on from there.
                self.done_seq = None
            g.stop_logging(t, seq)
            for vol in g.volumes.values():
                vol.forget()  # what the passes read
            return seq
        finally:
            t.finishing = False
            bm.end_pass()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _pass(self, regions: list, mode: str, epoch) -> None:
        """Send (or, checksum, compare and send) every region of one pass, and wait for
        the target to have all of them durable."""
        g, t = self.group, self.target
        self.mode, self.initial = t.resync_mode, t.resync_initial
        self.passes += 1
        self.total_bytes = self.done_bytes + sum(r[3] for r in regions)
        if mode == "checksum":
            loop = asyncio.get_running_loop()
            probes: deque = deque()
            for run in _runs(regions, CHUNK // self.gran or 1):
                if epoch != t.resync_epoch:
                    break
                # (a deferred secondary's volumes lag its journal by a step: its records
                # are not all laid over them after a restart; the hash is the volume's)
                await g.apply_through(g.commit.consistent_seq)
                volume, offset = run[0][0], run[0][2]
                length = sum(r[3] for r in run)
                ours = volume_hashes(g.volumes[volume], offset, length, self.gran)
                reply = loop.create_future()
                await self.peer.request_hashes(reply, ANY_SEQ, volume, offset, length)
                probes.append((run, ours, reply))
                if len(probes) >= HASH_DEPTH:
                    await self._settle(*probes.popleft())
            while probes:
                await self._settle(*probes.popleft())
        else:
            await g.apply_through(g.commit.consistent_seq)
            for volume, region, offset, length in regions:
                if epoch != t.resync_epoch:
                    break
                await self._send(volume, region, offset, g.read(volume, offset, length))
        await self._wait(lambda: not self.pending)

    async def _finish(self) -> int:
        """RESYNC_DONE at the bitmap's `through`, once its target ACKs it: that seq."""
        g, t = self.group, self.target
        bm = t.bitmap
        bm.end_pass()
        t.finishing = True  # the checkpointer must not move `through` any more
        seq = bm.through
        await self._begin(seq)
        await self.peer.send(ResyncDone(seq=seq, crc=g.journal.position(seq).hcrc))
        await self._wait(lambda: self.done_seq is not None)  # its ACK repeats seq (wire)
        t.finishing = False
        self.begun = None  # the pass is over: another one announces itself
        return seq

    async def _begin(self, seq: int) -> None:
        if seq != self.begun:
            await self.peer.send(ResyncBegin(seq=seq))
            self.begun = seq

    async def _read_acks(self) -> None:
        bm = self.target.bitmap
        try:
            while True:
                ev = await self.peer.next_reply(self.hb_timeout, "resyncing")
                if isinstance(ev, ResyncAck):
                    if not self.acked <= ev.count <= self.sent:
                        raise ShipError(f"{self.target.node} acknowledged {ev.count} resync "
                                        f"regions of {self.sent} sent")
                    for _ in range(ev.count - self.acked):
                        volume, region, length = self.pending.popleft()
                        bm.clear(volume, region)
                        self.done_bytes += length
                        self.pending_bytes -= length
                    self.acked = ev.count
                elif isinstance(ev, Ack):
                    self.done_seq = ev.seq
                self._wake.set()
        except BaseException as exc:
            self.error = exc
            self._wake.set()
            raise

    async def _wait(self, condition) -> None:
        """Until `condition()` holds; a heartbeat every hb_interval meanwhile."""
        while not condition():
            if self.error is not None:
                raise self.error
            self._wake.clear()
            try:  # (not wait_for: on 3.11 it loses a cancel that comes with the wake)
                async with asyncio.timeout(self.hb_interval):
                    await self._wake.wait()
            except TimeoutError:
                await self.peer.send(Heartbeat(sent_ns=time.time_ns()))

    async def _send(self, volume: str, region: int, offset: int, data) -> None:
        """RESYNC_DATA for one region, inside the window and the rate limit."""
        await self._wait(lambda: self.pending_bytes < RESYNC_WINDOW)
        await self.peer.send(ResyncData(volume=volume, offset=offset, payload=bytes(data)))
        self.pending.append((volume, region, len(data)))
        self.pending_bytes += len(data)
        self.sent += 1
        self.on_sent(len(data))
        limit = self.rate_limit()
        if limit:
            now = time.monotonic()
            self._tokens = min(limit, self._tokens + (now - self._refilled) * limit)
            self._refilled = now
            self._tokens -= len(data)
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / limit)

    async def _settle(self, run, ours, reply) -> None:
        """A checksum answer is in: send the regions whose hashes differ (as they are
        now: a write since the hashing marks them again), clear the rest."""
        await self._wait(reply.done)
        theirs = reply.result().hashes
        if len(theirs) != len(ours):
            raise ShipError(f"{self.target.node} returned {len(theirs)} bytes of hashes for "
                            f"{len(ours)}")
        diff = set(differing(ours, theirs))
        bm = self.target.bitmap
        for i, (volume, region, offset, length) in enumerate(run):
            if i in diff:
                await self._send(volume, region, offset, self.group.read(volume, offset, length))
            elif bm.clear(volume, region):
                self.done_bytes += length
                self.same_bytes += length
