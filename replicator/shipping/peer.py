"""The connection to one target, as the rest of shipping sees it.

`Dialer.connect()` opens a session: TCP (or TLS), HELLO/WELCOME, and the lineage
decision: a target on our line resumes at the seq its WELCOME names; one that
diverged (or holds records this node lost in a power loss) is resynced first; one
ahead of us, or at a seq whose record differs from ours, is not streamed to (state
`needs-resync`: its history diverged from ours).

`Peer` is the small interface the stream, the resync and verify use: `send`, `post`
(write without waiting, for early batches), `request_hashes`, and `next_reply`, the
one dispatch of what a target sends back (hash replies answered here, errors raised,
and the frames a target sends on its own, OFFLOAD, PROCESSED, MISMATCH, REPORT, handed
to whoever registered for them in `handlers`).
Every failure is a ShipError; a silence names the target, the group and what was
under way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from typing import Callable

from ..credentials import Credentials
from ..generations import Relation, compare, from_wire, to_wire
from ..group import Group, TargetLink
from ..transport import Link
from ..wire import (PROTOCOL_MAX, PROTOCOL_MIN, Ack, Connection, ConnectionClosed, Diverged,
                    Error, Feature, HashReply, HashRequest, Heartbeat, Hello, Refusal, Refuse,
                    ResyncAck, Role, Welcome, code_name)


class ShipError(Exception):
    """A session with a target ended for a reason worth reporting."""

    def __init__(self, message: str, state: str = "connecting"):
        super().__init__(message)
        self.state = state


class ShipTimeout(ShipError):
    """The target sent nothing for as long as we wait (or did not accept the connection)."""


class Peer:
    """One session's link to a target: what `Dialer.connect` agreed with it, and the
    frames both ways."""

    def __init__(self, link: Link, group: Group, target: TargetLink, *, compress: bool,
                 history: list, resume_seq: int | None, processed: bool = False):
        self.link = link
        self.group, self.target = group, target
        self.compress = compress  # zstd agreed for this session
        self.processed = processed  # Feature.PROCESSED agreed: PROCESSED may go down
        self.handlers: dict[type, Callable] = {}  # frame type -> its taker
        self.history = history  # the lineage this session's HELLO carried
        self.resume_seq = resume_seq  # stream from after it; None: resync first
        self._hash_ids = itertools.count(1)
        self._hash_waiters: dict[int, asyncio.Future] = {}

    async def send(self, *frames) -> None:
        await self.link.send(*frames)

    def can_post(self) -> bool:
        return self.link.can_post()

    def post(self, frame) -> None:
        self.link.post(frame)

    async def request_hashes(self, reply: asyncio.Future, seq: int, volume: str, offset: int,
                             length: int) -> None:
        """HASH_REQUEST for a range at `seq`; `reply` gets the HASH_REPLY."""
        req = HashRequest(id=next(self._hash_ids), seq=seq, volume=volume, offset=offset,
                          length=length, granularity=self.group.cfg.bitmap_granularity)
        self._hash_waiters[req.id] = reply
        await self.link.send(req)

    async def next_reply(self, timeout: float, during: str) -> Ack | ResyncAck | None:
        """The target's next frame: an ACK or RESYNC_ACK for the caller, None for a
        heartbeat or a hash reply (handed to its request here). An error, a close or a
        silence of `timeout` seconds raises ShipError."""
        node = self.target.node
        try:
            ev = await self.link.next_event(timeout)
        except TimeoutError:
            raise ShipTimeout(f"group {self.group.name}: {node} sent nothing for "
                              f"{timeout:.3g}s while {during}") from None
        if isinstance(ev, (Ack, ResyncAck)):
            return ev
        if isinstance(ev, HashReply):
            fut = self._hash_waiters.pop(ev.id, None)
            if fut is None:
                raise ShipError(f"{node} answered hash request {ev.id}, which is not "
                                "outstanding")
            if not fut.done():
                fut.set_result(ev)
            return None
        if isinstance(ev, Heartbeat):
            return None
        handler = self.handlers.get(type(ev))
        if handler is not None:
            handler(ev)
            return None
        if isinstance(ev, Error):
            raise ShipError(f"{node} reported error {code_name(ev.code)}: {ev.message}")
        if isinstance(ev, ConnectionClosed):
            raise ShipError(f"{node} closed the connection while {during}")
        raise ShipError(f"unexpected {type(ev).__name__} from {node} while {during}")

    def fail(self, exc: Exception) -> None:
        """The session is over: every hash request still waiting gets `exc`."""
        for fut in self._hash_waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._hash_waiters.clear()

    async def close(self) -> None:
        await self.link.close()


class Dialer:
    """Opens sessions with one target of a group."""

    def __init__(self, group: Group, target: TargetLink, *, node: str,
                 address: tuple[str, int], compress: bool, zstd_level: int, timeout: float,
                 initial_sync: str,
                 credentials: Credentials | None, log: logging.Logger,
                 processed: Callable[[], bool] = lambda: False):
        self.group, self.target = group, target
        self.node, self.address = node, address
        self.credentials = credentials  # its client context is read at each connect
        self.compress, self.zstd_level = compress, zstd_level
        self.processed = processed  # whether to offer Feature.PROCESSED (a relayed target)
        self.timeout = timeout  # for the connect and for each handshake frame
        self.initial_sync = initial_sync  # config.RESYNC_MODES, for a new target
        self.log = log

    async def connect(self) -> Peer:
        host, port = self.address
        g, t = self.group, self.target
        tls = self.credentials.client if self.credentials is not None else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=tls,
                                        server_hostname=t.node if tls else None),
                self.timeout)
        except ssl.SSLError as exc:
            raise ShipError(f"TLS with {t.node} at {host}:{port} failed: "
                            f"{getattr(exc, 'verify_message', None) or exc.reason or exc}",
                            state="refused") from None
        except TimeoutError:
            raise ShipTimeout(f"group {g.name}: connecting to {t.node} at {host}:{port} "
                              f"timed out after {self.timeout:.3g}s") from None
        link = Link(reader, writer, Connection(Role.SENDER, zstd_level=self.zstd_level))
        try:
            features = Feature.ZSTD if self.compress else Feature(0)
            if self.processed():
                features |= Feature.PROCESSED
            history = list(g.lineage.history)
            # Everything we may have shipped before (early, to a sync target) is durable
            # and in the journal, so a target is never ahead of the seq we name.
            await g.commit.commit_now()
            await link.send(Hello(proto_min=PROTOCOL_MIN, proto_max=PROTOCOL_MAX,
                                  features=features, node=self.node, group=g.name,
                                  target=t.node, seq=g.journal.last_seq,
                                  history=to_wire(history)))
            ev = self._welcome(await self._handshake_frame(link, "WELCOME"))
            verdict = compare(g.lineage.history, g.journal.last_seq,
                              from_wire(ev.history), ev.seq)
            if verdict.relation in (Relation.DIVERGED, Relation.SPLIT_BRAIN):
                # (split brain accepted: the target was told we are the survivor)
                diverged = await self._handshake_frame(link, "DIVERGED")
                while isinstance(diverged, Heartbeat):  # it is saving what it rolls back
                    diverged = await self._handshake_frame(link, "DIVERGED")
                if not isinstance(diverged, Diverged):
                    raise ShipError(f"{t.node} sent {type(diverged).__name__}, "
                                    "expected DIVERGED")
                resume_seq = self._rejoin(diverged)
            else:
                resume_seq = self._resume_from(ev)
            g.lineage.reconciled(t.node)
        except BaseException:
            await link.close()
            raise
        return Peer(link, g, t, compress=self.compress and bool(ev.features & Feature.ZSTD),
                    history=history, resume_seq=resume_seq,
                    processed=bool(ev.features & Feature.PROCESSED))

    def _welcome(self, ev) -> Welcome:
        """The answer to our HELLO, if it is a WELCOME from the node we called."""
        t = self.target
        if isinstance(ev, Refuse):
            state = {Refusal.SPLIT_BRAIN: "split-brain", Refusal.STALE: "stale"}.get(
                ev.code, "refused")
            if state == "split-brain":
                self.group.lineage.diverged(t.node, reason=ev.reason)
            # stale: the target follows a later primary. That is no reason to stop
            # being primary here (a peer's claim is no authority): the operator
            # demotes this node (replicator demote) once it knows who took over.
            raise ShipError(f"refused by {t.node}: {code_name(ev.code)}: {ev.reason}",
                            state=state)
        if not isinstance(ev, Welcome):
            raise ShipError(f"{t.node} closed the connection during the handshake")
        if ev.node != t.node:
            host, port = self.address
            raise ShipError(f"{host}:{port} answered as {ev.node!r}, expected "
                            f"{t.node!r} (peers address book wrong?)", state="refused")
        return ev

    async def _handshake_frame(self, link: Link, expected: str):
        try:
            return await link.next_event(self.timeout)
        except TimeoutError:
            raise ShipTimeout(f"group {self.group.name}: {self.target.node} sent no "
                              f"{expected} within {self.timeout:.3g}s of our HELLO") from None

    def _rejoin(self, ev: Diverged) -> None:
        """The target holds records past `fork` that our line does not have (it was the
        primary of a takeover, or ahead of the replica promoted): resync the regions
        written on either side since the fork, which rolls its records back."""
        self.target.connected = True
        self.group.request_rejoin(self.target, ev.fork, ev.extents if ev.complete else None)
        return None

    def _resume_from(self, welcome: Welcome) -> int | None:
        """The seq to stream from after, or None: resync first."""
        g, t = self.group, self.target
        j = g.journal
        if welcome.seq > j.last_seq and g.unclean_start:
            # We went down uncleanly and our journal lost records it had shipped (the
            # page cache of a power loss): never flushed here, so nobody was promised
            # them. The target follows our image: a checksum resync rolls them back.
            self.log.warning("group %s -> %s: %s holds seq %d..%d, which this node lost "
                             "when it went down (never flushed): rolled back by a checksum "
                             "resync", g.name, t.node, t.node, j.last_seq + 1, welcome.seq)
            t.reset_position(j.last_seq)  # what it acked past that is gone here too
            return self._rejoin(Diverged(fork=j.last_seq, complete=False))
        if welcome.seq > j.last_seq:
            raise ShipError(f"{t.node} is at seq {welcome.seq}, ahead of this node "
                            f"({j.last_seq}): it has writes we do not", state="needs-resync")
        ours = j.position(welcome.seq)
        if ours is not None and ours.hcrc != welcome.crc:
            raise ShipError(f"{t.node} diverged: its record {welcome.seq} differs "
                            "from ours", state="needs-resync")
        t.connected = True
        if not t.synced and not t.logging and welcome.seq == 0:
            g.request_resync(t, self.initial_sync, "initial sync of a new target", initial=True)
        if not (t.logging or ours is None or welcome.seq < t.acked_seq):
            t.reset_position(welcome.seq)
            g.targets_changed()
            self.log.info("group %s -> %s: streaming from seq %d", g.name, t.node,
                          welcome.seq + 1)
            return welcome.seq
        if not t.logging or welcome.seq < t.acked_seq:
            why = (f"the journal no longer holds its position {welcome.seq}" if ours is None
                   else f"it is at seq {welcome.seq}, behind its acknowledged {t.acked_seq}")
            # Its image is consistent at its seq: only regions that differ need to move.
            g.request_resync(t, "checksum", why)
        return None
