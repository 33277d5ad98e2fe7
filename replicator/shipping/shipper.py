"""Per-target sender: ships a group's journal to one target, FIFO, from the target's
own position, and keeps the target's TargetLink (acked seq, in-sync) current.

A Shipper runs sessions, one after another: connect and handshake (peer.Dialer), a
resync first when the target needs one (resync.Resync), then the record stream
(stream.Stream) until the session fails. Between sessions it backs off (0.1 s doubling
to RECONNECT_MAX, each wait jittered) and reconnects; it always resumes from the
position the target reports in WELCOME, so nothing is skipped and nothing is applied
twice. The cap is short so that a target that restarts is streamed to within a second
of listening: an attempt on a peer whose agent is down costs a SYN and its RST (two to
four a second per target), and one on a dead WAN peer waits out its connect timeout
(heartbeat_timeout) first, so it cannot spin. A target that refuses us (split brain,
stale, needs-resync, TLS) waits REFUSED_BACKOFF: that takes an operator, not a retry.
A session the stall watchdog ends (stream.Stalled: records in flight and no ACK
progress for stall_timeout) is counted (`stalls`), logged and an event (stalled), then
reconnected like any other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable

from ..credentials import Credentials
from ..events import emit
from ..group import Group, TargetLink, wake_all
from ..journal.segments import JournalError
from ..wire import ZSTD_LEVEL, Handover, LocalProtocolError, RemoteProtocolError, Report, Successor
from .peer import Dialer, Peer, ShipError
from .resync import Resync
from .stream import Stalled, Stream
from .verify import Verify

STREAMING_STATES = ("replicating", "catching-up")
RECONNECT_MIN, RECONNECT_MAX = 0.1, 0.5  # seconds between connects to a target that is away
REFUSED_BACKOFF = 5.0  # seconds after a target refused the session


class Shipper:
    """The one object the agent holds per target: its sessions, its resync and verify,
    the switchover orders for it, and its status."""

    def __init__(self, group: Group, link: TargetLink, *, node: str,
                 address: tuple[str, int], compress: bool, zstd_level: int = ZSTD_LEVEL,
                 heartbeat_interval: float, heartbeat_timeout: float, sync_ack_timeout: float = 10.0,
                 stall_timeout: float = 60.0,
                 initial_sync: str = "full",
                 credentials: Credentials | None = None, relays: dict | None = None):
        self.group = group
        self.target = link
        self.address = address
        self.compress = compress  # configured; the session's Peer says what was agreed
        self.zstd_level = zstd_level
        self.hb_interval = heartbeat_interval
        self.log = logging.getLogger(f"replicator.ship.{group.name}.{link.node}")
        self.relays = relays if relays is not None else {}  # the group's, by far target
        self.dialer = Dialer(group, link, node=node, address=address, compress=compress,
                             zstd_level=zstd_level, timeout=heartbeat_timeout,
                             initial_sync=initial_sync, credentials=credentials,
                             log=self.log, processed=lambda: link.node in self.relays)
        self.stream = Stream(group, link, hb_interval=heartbeat_interval,
                             hb_timeout=heartbeat_timeout, sync_ack_timeout=sync_ack_timeout,
                             stall_timeout=stall_timeout,
                             on_caught_up=lambda: self._set_state("replicating"),
                             on_ack=self._notify, relays=self.relays)
        self.hb_timeout = heartbeat_timeout
        self.state = "connecting"
        self.shown = "connecting"  # the state last announced (events.py): phase()'s
        self.last_error = ""
        self.sessions = 0  # sessions established; every one after the first is a reconnect
        self.stalls = 0  # sessions the stall watchdog ended
        self.last_verify: dict | None = None  # {time, mismatches, bytes_checked}
        self.resync_rate = group.cfg.resync_rate  # bytes/s, 0 = unlimited; runtime-settable
        self.resync: Resync | None = None  # the running resync
        self._resync_waiters: list[asyncio.Future] = []
        self._changes = asyncio.Event()  # set whenever the state or the acked seq moves
        self._peer: Peer | None = None  # the running session's
        self._wire_bytes = 0  # written to the sockets of sessions that ended
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.report: dict | None = None  # the target's last REPORT (report.py)
        self.report_received = 0.0  # unix time it came

    @property
    def bytes_sent(self) -> int:
        return self.stream.bytes_sent

    @property
    def wire_bytes(self) -> int:
        """Bytes written to the target's sockets, frames and all, over every session."""
        return self._wire_bytes + (self._peer.link.bytes_out if self._peer is not None else 0)

    def start(self) -> None:
        emit("state", self.group.name, self.target.node, state=self.shown, previous=None,
             error="")
        self._task = asyncio.create_task(self._run(), name=f"ship-{self.group.name}-{self.target.node}")

    async def stop(self) -> None:
        self._stopping = True
        # Cancel until it is done: asyncio.wait_for (Python 3.11) can swallow a
        # cancellation that lands as its inner await completes.
        while self._task and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
        self._disconnected()

    def _set_state(self, state: str) -> None:
        self.state = state
        self._notify()

    def _notify(self) -> None:
        self._changes.set()
        self.announce()

    def announce(self) -> None:
        """Emit a `state` event when the state status shows has changed since the last
        one (the agent also calls this each second: logging starts in the group)."""
        phase = self.phase()
        if phase != self.shown:
            previous, self.shown = self.shown, phase
            why = {"why": self.target.why} if phase == "logging" else {}
            emit("state", self.group.name, self.target.node, state=phase, previous=previous,
                 error=self.last_error, **why)

    @property
    def reconnects(self) -> int:
        return max(0, self.sessions - 1)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Until `condition()` holds, looked at whenever this shipper's state, its
        verify or its target's acked seq changes."""
        while not condition():
            self._changes.clear()
            await self._changes.wait()

    async def _run(self) -> None:
        backoff = RECONNECT_MIN
        while not self._stopping:
            peer, wait = None, 0.0
            try:
                peer = self._peer = await self.dialer.connect()
                self.sessions += 1
                backoff = RECONNECT_MIN
                await self._session(peer)
            except (OSError, asyncio.TimeoutError, ShipError, LocalProtocolError,
                    RemoteProtocolError, JournalError) as exc:
                state = exc.state if isinstance(exc, ShipError) else "connecting"
                if isinstance(exc, Stalled):
                    self.stalls += 1
                    emit("stalled", self.group.name, self.target.node,
                         backlog_records=exc.backlog_records, seconds=round(exc.seconds, 3))
                msg = str(exc) or type(exc).__name__
                if msg != self.last_error or state != self.state:
                    self.log.warning("group %s -> %s: %s", self.group.name, self.target.node, msg)
                self.last_error = msg
                self._set_state(state)
                if state in ("refused", "needs-resync", "split-brain", "stale"):
                    wait = REFUSED_BACKOFF
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not end the shipper silently
                self.log.exception("group %s -> %s: the shipper failed", self.group.name,
                                   self.target.node)
                self.last_error = f"internal error: {type(exc).__name__}: {exc}"
                self._set_state("failed")
                wait = REFUSED_BACKOFF  # said loudly, then tried again
            finally:
                self._disconnected()
                if self._peer is not None:
                    self._wire_bytes += self._peer.link.bytes_out
                self._peer = None
                if peer is not None:
                    await peer.close()
            # Jittered (half to all of it) so that the shippers of many groups to one
            # target do not all knock at once.
            await asyncio.sleep(wait or backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, RECONNECT_MAX)

    async def _session(self, peer: Peer) -> None:
        self.last_error = ""
        peer.handlers[Report] = self._took_report
        if peer.resume_seq is None:
            self._set_state("resyncing")
            await self._resync(peer)
        else:
            self.stream.resume(peer.resume_seq)
            self._set_state("catching-up")
        self.group.guard.look()  # streaming from now on: a throttle gates the next write
        await self.stream.run(peer)

    def _took_report(self, ev: Report) -> None:
        """The target's replication tree (report.py), as it last sent it."""
        self.report, self.report_received = ev.report, time.time()

    def _disconnected(self) -> None:
        if self.target.connected:
            self.target.connected = False
            self.target.disconnected_at = time.monotonic()
        self.resync = None
        if self.target.in_sync:
            self.target.in_sync = False
            self.group.targets_changed()
        if self.state in ("replicating", "catching-up", "resyncing"):
            self._set_state("connecting")
        lost = ShipError(f"the link to {self.target.node} went down"
                         + (f": {self.last_error}" if self.last_error else ""))
        if self._peer is not None:
            self._peer.fail(lost)
        self.stream.ended(lost)

    async def _resync(self, peer: Peer) -> None:
        g, t = self.group, self.target
        r = self.resync = Resync(g, t, peer, hb_interval=self.hb_interval,
                                 hb_timeout=self.hb_timeout,
                                 rate_limit=lambda: self.resync_rate, on_sent=self.stream.count)
        emit("resync_started", g.name, t.node, mode=t.resync_mode, initial=t.resync_initial,
             why=t.why)
        try:
            seq = await r.run()
        finally:
            self.resync = None
        emit("resync_done", g.name, t.node, through_seq=seq, mode=r.mode or "full",
             checked_bytes=r.done_bytes, sent_bytes=r.done_bytes - r.same_bytes,
             passes=r.passes, seconds=round(time.monotonic() - r.started, 3))
        self.stream.resume(seq)
        self._set_state("catching-up")
        self.log.info("group %s -> %s: %s resync complete at seq %d (%d bytes checked, %d "
                      "sent, %d pass(es) in %.3fs); streaming from seq %d", g.name, t.node,
                      r.mode or "full", seq, r.done_bytes, r.done_bytes - r.same_bytes,
                      r.passes, time.monotonic() - r.started, seq + 1)
        wake_all(self._resync_waiters)

    def flush(self, seq: int) -> None:
        """Have the target make every record through `seq` durable now (a switchover
        waits for that), instead of within its commit_interval."""
        self.stream.flush(seq)

    def poke(self) -> None:
        """Wake the pump: a verify request is queued, or the target must resync now."""
        self.stream.poke()

    def streaming(self) -> bool:
        return self.target.streaming and self.state in STREAMING_STATES

    # ---- switchover -----------------------------------------------------------------------
    async def handover(self, seq: int, targets: tuple, timeout: float) -> None:
        """Make the target the primary at `seq` (every record through it sent first):
        returns when it says it is."""
        if not self.streaming():
            raise ShipError(f"{self.target.node} is {self.phase()}: a switchover needs it "
                            "replicating")
        await self.stream.order(seq, Handover(seq=seq, targets=targets), timeout)

    async def name_successor(self, node: str, seq: int, timeout: float) -> None:
        """Tell the target (SUCCESSOR) that `node` becomes its source after `seq` (every
        record through it sent first): returns when it says it heard."""
        if not self.streaming():
            raise ShipError(f"{self.target.node} is {self.phase()}")
        await self.stream.order(seq, Successor(seq=seq, node=node), timeout)

    # ---- online verify -----------------------------------------------------------------
    async def verify(self, ranges: list[tuple[str, int, int | None]]) -> dict:
        """Compare the hashes of every region of `ranges` (volume, offset, length or
        None for the rest of the volume) on the target with ours, in-band: each chunk is
        hashed here at some seq and on the target after exactly that seq."""
        t, g = self.target, self.group
        if t.bunker:
            raise ShipError(f"{t.node} is a bunker: it holds no volumes to verify (every "
                            "record it keeps is checksummed)")
        if not self.streaming():
            raise ShipError(f"{t.node} is {self.phase()}: verify needs a target that is "
                            "replicating")
        if self.stream.verifying is not None:
            raise ShipError(f"a verify of {t.node} is already running")
        try:
            result = await self.stream.verify(Verify(g, t, ranges))
        finally:
            self._notify()  # no longer verifying
        self.log.info("group %s -> %s: verified %d bytes at seq %s..%s in %.1fs: %d "
                      "mismatching region(s)", g.name, t.node, result["bytes_checked"],
                      result["first_seq"], result["last_seq"], result["seconds"],
                      len(result["mismatches"]))
        self.last_verify = {"time": time.time(), "mismatches": len(result["mismatches"]),
                            "bytes_checked": result["bytes_checked"]}
        emit("verify", g.name, t.node, mismatches=len(result["mismatches"]),
             bytes_checked=result["bytes_checked"], first_seq=result["first_seq"],
             last_seq=result["last_seq"], seconds=result["seconds"])
        return result

    async def repair(self, mismatches: list[dict]) -> dict:
        """Resync exactly the regions verify found different (and anything else the target
        has not acknowledged); returns when the target streams again."""
        regions = [(m["volume"], m["offset"], m["length"]) for m in mismatches]
        done = asyncio.get_running_loop().create_future()
        self._resync_waiters.append(done)
        self.group.mark_for_repair(self.target, regions)
        self.poke()
        await done
        return {"regions": len(regions), "bytes": sum(r[2] for r in regions)}

    def phase(self) -> str:
        """The state status() shows: logging or verifying over the session's."""
        if self.target.logging and self.state not in ("resyncing", "refused", "needs-resync",
                                                      "split-brain", "stale"):
            return "logging"
        if self.stream.verifying is not None and self.state in STREAMING_STATES:
            return "verifying"
        return self.state

    def status(self) -> dict:
        t, s = self.target, self.stream
        records, nbytes, seconds = self.group.lag(t)
        return {
            "node": t.node,
            "address": f"{self.address[0]}:{self.address[1]}",
            "mode": t.mode,
            "compress": "zstd" if self.compress else "none",
            **({"compress_level": self.zstd_level} if self.compress else {}),
            "state": self.phase(),
            "in_sync": t.in_sync,
            **({"bunker": True, "far_lag_records": {
                n: max(0, t.acked_seq - o.acked_seq)
                for n, o in self.group.targets.items() if n != t.node and not o.bunker}}
               if t.bunker else {}),
            "on_disconnect": "block" if t.block else "continue",
            "dirty_bytes": t.bitmap.dirty_bytes() if t.logging else 0,
            "resync": self.resync.status() if self.resync is not None else None,
            "verify": s.verifying.status() if s.verifying is not None else None,
            "acked_seq": t.acked_seq,
            "written_seq": t.written_seq,
            "durable_seq": t.acked_seq,
            "sent_seq": s.sent_seq,
            "lag_records": records,
            "lag_bytes": nbytes,
            "lag_seconds": round(seconds, 3),
            "bytes_sent": s.bytes_sent,
            "early_batches": s.early_batches,
            "stalls": self.stalls,
            "lag_limit": self.group.guard.status(t),
            **({"offload": self.relays[t.node].status()} if t.node in self.relays else {}),
            **({"interval": t.cfg.interval, "last_epoch": s.last_epoch,
                "next_due": round(s.next_due(), 3) if self.streaming() else None}
               if t.mode == "periodic" else {}),
            "last_error": self.last_error,
        }
