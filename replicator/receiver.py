"""Replication listener: accepts upstream senders and feeds their records into the
local replica group (which journals, applies in seq order and forwards downstream).

Per connection: the TLS handshake (refusals logged with the reason), then HELLO is
checked (admission.py), then WELCOME reports the group's durable position. Each
RECORDS batch goes to Group.submit_records; HASH_REQUESTs are answered in stream order
(online verify); once a batch is written, and again once it is durable, an ACK goes
back: one per turn of the loop, posted at once, or, while the socket is backed up, sent
by the session's ACK task after a drain for everything that happened meanwhile (ACKs
coalesce).
A newer connection for the same group replaces an older one (a half-dead link must not
block its own reconnection).

Processing offload (offload/session.py): a near replica processes what it receives for
the far targets its source asks for (OFFLOAD) and for this node's own processed
targets, and sends the source the PROCESSED runs; a far replica restores the PROCESSED
runs it is relayed and journals them like RECORDS, and reports a write it cannot take
(another base here) with MISMATCH before it closes.

Who may do what here (connect, read the journal, ship records, name a successor) is
admission.py's to say; each refusal is logged at WARNING with the peer's name, address
and certificate subject. A FETCH connection is served by bunker.py (serve_fetch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

from .admission import Admission, welcome
from .bunker import serve_fetch
from .config import TargetConfig
from .credentials import Credentials
from .events import emit
from .generations import Generation, Relation, Verdict, from_wire
from .group import Group, GroupError
from .journal.segments import Position
from .offload.codec import ProcessedError
from .offload.session import Processing, Restoring
from .report import REPORT_INTERVAL
from .transport import Link, peer_node, tls_failure
from .verify import volume_hashes
from .wire import (ANY_SEQ, PROTOCOL_MAX, PROTOCOL_MIN, SUPPORTED_FEATURES, Ack, Connection,
                   ConnectionClosed, Diverged, Error, Feature, Flush, Handover, HashReply,
                   HashRequest, Heartbeat, Hello, LocalProtocolError, Mismatch, Offload,
                   Processed, Records, Refusal, Refuse, RemoteProtocolError, Report, ResyncAck,
                   ResyncBegin, ResyncData, ResyncDone, Retain, Role, Successor, code_name,
                   negotiate)


LISTEN_BACKLOG = 100  # what asyncio.start_server listened with
ACCEPT_RETRY_DELAY = 1.0  # seconds, after accept(2) failed (asyncio's servers wait as long)
CLOSE_TIMEOUT = 5.0  # seconds close() waits for cancelled links to end (Link.close waits 2)


async def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to, as asyncio.start_server
    binds them (SO_REUSEADDR; IPv6 sockets IPv6 only)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class _Session:
    def __init__(self, link: Link, group: Group, source: str, history: list[Generation]):
        self.link = link
        self.group = group
        self.source = source
        self.history = history  # the sender's: ours once its image is ours
        self.ack_seq = 0
        self.ack_scheduled = False  # an ACK goes out at the end of this turn of the loop
        self.ack_wanted = asyncio.Event()  # an ACK waits for the socket to drain
        self.ack_task: asyncio.Task | None = None
        self.failed: str | None = None
        self.resync_items: list = []  # RESYNC_DATA received, not yet applied
        self.resync_applied = 0  # RESYNC_DATA frames durable, for RESYNC_ACK
        self.resync_task: asyncio.Task | None = None
        self.processing: Processing | None = None  # near replica: what it processes
        self.restoring: Restoring | None = None  # far replica: Feature.PROCESSED agreed
        self.report_task: asyncio.Task | None = None


class Receiver:
    def __init__(self, node: str, groups: dict[str, Group], *, heartbeat_timeout: float,
                 promote, peers=(), credentials: Credentials | None = None,
                 log: logging.Logger | None = None, relays: dict | None = None,
                 report=None):
        self.node = node
        self.log = log or logging.getLogger("replicator.receiver")
        self.credentials = credentials  # its `server` context is read at each accept
        self.admission = Admission(node, peers, tls=self._tls() is not None, log=self.log)
        self.promote = promote  # async (group, [TargetConfig]): HANDOVER makes us primary
        self.groups = groups
        # group -> far target -> relay (the agent's): those without `via` this node's
        # receiver feeds (a cascade that processes here)
        self.relays = relays if relays is not None else {}
        self.report = report  # group -> this node's replication tree (report.py), or None
        # group -> future done when a switchover of it here ends (set by the agent): a
        # HELLO meanwhile waits for it, so that the new primary finds this node demoted
        self.switching: dict[str, asyncio.Future] = {}
        self.hb_timeout = heartbeat_timeout
        self.sessions: dict[str, _Session] = {}
        self._listeners: list[socket.socket] = []
        self._accepting: list[asyncio.Task] = []
        self._conns: set[asyncio.Task] = set()

    def _tls(self) -> ssl.SSLContext | None:
        return self.credentials.server if self.credentials is not None else None

    async def start(self, host: str, port: int) -> None:
        # Accepted sockets become streams here (_open), TLS from their first byte, so that
        # a refused handshake (a certificate of another CA, or none) is logged with its
        # reason. (Starting TLS on a stream that already reads, start_server then
        # start_tls, can lose the peer's ClientHello into the stream's buffer: uvloop
        # reads before the connection's task runs, and the handshake then times out.)
        self._listeners = await _listen(host, port)
        self._accepting = [asyncio.create_task(self._accept(sock), name="replication-accept")
                           for sock in self._listeners]

    def reconfigure(self, peers, heartbeat_timeout: float) -> None:
        """A reloaded address book and heartbeat timeout: every HELLO from now on is
        judged by them; sessions already admitted go on (a peer removed is refused when it
        reconnects)."""
        self.admission.peers = set(peers)
        self.hb_timeout = heartbeat_timeout

    async def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            _, stuck = await asyncio.wait(set(self._conns), timeout=CLOSE_TIMEOUT)
            if stuck:
                self.log.warning("replication listener closed with %d link(s) still ending "
                                 "after %gs", len(stuck), CLOSE_TIMEOUT)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # out of descriptors, say: the listener itself is fine
                self.log.warning("replication listener: accept failed: %s; retrying in "
                                 "%gs", exc, ACCEPT_RETRY_DELAY)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            task = asyncio.create_task(self._handle(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _open(self, sock: socket.socket) -> tuple | None:
        """(reader, writer) over an accepted socket, after the TLS handshake when TLS is
        on; None (logged) when that fails."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            peer = sock.getpeername()
            where = f"{peer[0]}:{peer[1]}"
        except OSError:  # gone already
            where = "?"
        tls = self._tls()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=tls,
                ssl_handshake_timeout=self.hb_timeout if tls is not None else None)
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            if tls is None:
                raise
            self.log.warning("refused a replication connection from %s: TLS handshake "
                             "failed: %s", where, tls_failure(exc))
            return None
        # (uvloop returns its TLS protocol here, not ours: the writer is built on ours)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _handle(self, sock: socket.socket) -> None:
        link = session = writer = None
        try:
            streams = await self._open(sock)
            if streams is None:
                return
            reader, writer = streams
            link = Link(reader, writer, Connection(Role.RECEIVER))
            session = await self._handshake(link)
            if session:
                def listener(_seq, s=session):
                    self._ack_soon(s)
                session.group.commit.durable_listeners.add(listener)
                session.ack_task = asyncio.create_task(
                    self._acks(session), name=f"replication-acks-{session.group.name}")
                if self.report is not None:
                    session.report_task = asyncio.create_task(
                        self._reports(session),
                        name=f"replication-reports-{session.group.name}")
                try:
                    await self._serve(session)
                finally:
                    session.group.commit.durable_listeners.discard(listener)
                    emit("source_lost", session.group.name, source=session.source,
                         error=str(session.failed or ""))
        except (OSError, asyncio.TimeoutError) as exc:
            self.log.info("replication link from %s ended: %s", _who(link, session),
                          exc or type(exc).__name__)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self.log.warning("protocol error from %s: %s", _who(link, session), exc)
            if isinstance(exc, RemoteProtocolError):
                link.post_failure()  # tell it why, then close
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug ends this link, loudly; the listener lives on
            self.log.exception("replication link from %s failed", _who(link, session))
        finally:
            if session and self.sessions.get(session.group.name) is session:
                del self.sessions[session.group.name]
            for task in (session.ack_task, session.report_task) if session else ():
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if session and session.processing is not None:
                await session.processing.close()
            if session and session.resync_task is not None:
                session.failed = session.failed or "connection ended"
                await asyncio.gather(session.resync_task, return_exceptions=True)
            if link is not None:
                await link.close()
            elif writer is not None:
                writer.close()

    async def _handshake(self, link: Link) -> _Session | None:
        """Judge the sender's HELLO (admission.py); the session it opens, or None once
        it was refused or served a FETCH."""
        ev = await link.next_event(self.hb_timeout)
        if isinstance(ev, ConnectionClosed):
            return None
        if isinstance(ev, Error):  # TRANSITIONS allow nothing else but HELLO first
            self.log.warning("%s reported %s before its HELLO: %s", link.who(),
                             code_name(ev.code), ev.message)
            return None
        agreed = negotiate(ev, PROTOCOL_MIN, PROTOCOL_MAX, SUPPORTED_FEATURES)
        group = self.groups.get(ev.group)
        refused = self.admission.admit(ev, group, agreed, peer_node(link.writer))
        if refused is None and agreed[1] & Feature.FETCH:
            refused = self.admission.may_fetch(ev, group)
            if refused is None:
                await serve_fetch(link, ev, group, agreed, node=self.node,
                                  timeout=self.hb_timeout, log=self.log)
                return None
        if refused is None:
            verdict = self.admission.verdict(ev, group)
            switching = self.switching.get(group.name)
            if switching is not None and not switching.done():
                # A switchover here is handing over to (maybe) this sender: judge its HELLO
                # by the role the switchover leaves, not the one it is leaving.
                await asyncio.wait({switching}, timeout=self.hb_timeout)
            refused = self.admission.judge(ev, group, verdict)
        if refused:
            self.log.warning("refused group %s to %s: %s: %s", ev.group, link.who(ev.node),
                             code_name(refused.code), refused.reason)
            if group is not None:  # (strangers' HELLOs are the log's, not the stream's)
                emit("refused", group.name, peer=str(ev.node), code=code_name(refused.code),
                     reason=refused.reason)
            await link.send(Refuse(code=refused.code, reason=refused.reason))
            return None
        return await self._open_session(link, ev, group, agreed, verdict)

    async def _open_session(self, link: Link, ev: Hello, group: Group, agreed,
                            verdict: Verdict) -> _Session:
        """WELCOME an admitted sender (and tell it what diverged here); its session."""
        self.admission.source_connected(group)
        old = self.sessions.get(group.name)
        if old is not None:
            self.log.info("group %s: new connection from %s replaces the old one",
                          group.name, ev.node)
            old.failed = "replaced by a newer connection"
            await old.link.close()
        history = from_wire(ev.history)
        session = _Session(link, group, ev.node, history)
        if agreed[1] & Feature.PROCESSED and group.volumes:
            session.restoring = Restoring(group, self.node, self.log)
        local = [r for r in self.relays.get(group.name, {}).values() if r.via is None]
        if local and group.volumes:
            session.processing = self._processing(session, local)
        self.sessions[group.name] = session
        await group.commit.settle()
        pos = group.journal.position(group.commit.consistent_seq)
        await link.send(welcome(group, self.node, agreed))
        if verdict.relation == Relation.DIVERGED:
            group.markers.cut(verdict.fork)  # points of a line that is given up
        if verdict.relation == Relation.DIVERGED and group.role == "bunker":
            # Records past the fork were never acknowledged on the new line; a bunker has
            # no volumes to roll back: the sender just restarts its journal at its position.
            self.log.warning("group %s: records %d..%d of this bunker are not on %s's line: "
                             "dropped", group.name, verdict.fork + 1, pos.seq, ev.node)
            await link.send(Diverged(fork=verdict.fork, complete=True))
        elif verdict.relation == Relation.DIVERGED:
            complete, extents = group.lineage.diverged_extents(verdict.fork)
            extents = _merge(extents)
            self.log.warning("group %s: records %d..%d here never reached %s's line: they "
                             "are rolled back by a resync of the regions they wrote",
                             group.name, verdict.fork + 1, pos.seq, ev.node)
            if not group.inconsistent:  # else saved before the resync began
                await self._keep_alive(link, group.lineage.save_diverged, verdict.fork,
                                       extents if complete else None)
            await link.send(Diverged(fork=verdict.fork, complete=complete,
                                     extents=tuple(extents)))
        else:
            group.adopt(history, ev.node)
        group.lineage.reconciled(ev.node)
        self.log.info("group %s: %s connected, resuming after seq %d", group.name, ev.node, pos.seq)
        emit("source_connected", group.name, source=ev.node, after_seq=pos.seq)
        return session

    async def _keep_alive(self, link: Link, func, *args):
        """Run func(*args) in a thread, sending heartbeats meanwhile."""
        fut = asyncio.get_running_loop().run_in_executor(None, func, *args)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=self.hb_timeout / 3)
            if done:
                return fut.result()
            await link.send(Heartbeat(sent_ns=0))

    async def _serve(self, s: _Session) -> None:
        while s.failed is None:
            ev = await s.link.next_event(self.hb_timeout)
            if isinstance(ev, Flush):
                if s.group.commit.durable_seq >= ev.seq:
                    self._ack_soon(s)
                else:
                    s.group.commit.commit_soon()  # its durable_listener acks
            elif isinstance(ev, Records):
                if not await self._records(s, ev.first_seq, ev.last_seq, ev.payload):
                    return
                if s.restoring is not None:  # (restored records feed it as they restore)
                    s.restoring.records(ev.payload)
            elif isinstance(ev, (Processed, Offload)) and s.group.commit.delayed:
                await self._refuse_processing(s)
                return
            elif isinstance(ev, Processed):
                if not await self._processed(s, ev):
                    return
            elif isinstance(ev, Offload):
                if s.processing is None:
                    s.processing = self._processing(s, [])
                await s.link.send(s.processing.ask(ev))
            elif isinstance(ev, ResyncData):
                s.resync_items.append((ev.volume, ev.offset, ev.payload))
                if s.resync_task is None or s.resync_task.done():
                    s.resync_task = asyncio.create_task(self._apply_resync(s))
            elif isinstance(ev, ResyncBegin):
                pass  # the connection checks that RESYNC_DONE ends the pass at this seq
            elif isinstance(ev, ResyncDone):
                if s.resync_task is not None:
                    await s.resync_task
                if s.failed is not None:
                    break
                first = s.history[-1].first_seq if s.history else 1
                if ev.seq < first - 1:
                    why = (f"RESYNC_DONE at seq {ev.seq}, before {s.source}'s generation "
                           f"{s.history[-1]} began: not a position of its line")
                    self.log.warning("group %s: refused from %s: %s", s.group.name,
                                     s.link.who(s.source), why)
                    await s.link.send(Error(code=Refusal.POSITION, message=why))
                    return
                await s.group.finish_resync(Position(ev.seq, ev.crc))
                s.group.adopt(s.history, s.source)
                s.ack_seq = ev.seq
                await s.link.send(Ack(seq=ev.seq, durable=ev.seq))
            elif isinstance(ev, Handover):
                await self._handover(s, ev)
                return
            elif isinstance(ev, Successor):
                if not await self._successor(s, ev):
                    return
            elif isinstance(ev, HashRequest):
                problem = await self._hash(s, ev)
                if problem:
                    self.log.error("group %s: hash request from %s: %s", s.group.name,
                                   s.source, problem)
                    await s.link.send(Error(code=Refusal.HASH_REFUSED, message=problem[:1000]))
                    return
            elif isinstance(ev, Retain):
                s.group.retention.retain(ev.seq)
            elif isinstance(ev, Heartbeat):
                await s.link.send(Heartbeat(sent_ns=ev.sent_ns))
            elif isinstance(ev, Error):
                self.log.warning("group %s: %s reported %s: %s", s.group.name, s.source,
                                 code_name(ev.code), ev.message)
                return
            elif isinstance(ev, ConnectionClosed):
                return
        self.log.warning("group %s: link from %s closed: %s", s.group.name, s.source, s.failed)

    async def _records(self, s: _Session, first: int, last: int, payload) -> bool:
        """Journal a batch of records (and process it, on a near replica); False once
        it was refused (the session ends)."""
        try:
            s.group.commit.submit_records(first, last, payload,
                                          lambda err, seq=last: self._done(s, seq, err))
        except GroupError as exc:
            self.log.error("group %s: records %d..%d from %s refused: %s", s.group.name,
                           first, last, s.link.who(s.source), exc)
            await s.link.send(Error(code=Refusal.BAD_RECORDS, message=str(exc)[:1000]))
            return False
        # In this same turn of the loop: none of them is visible to reads yet.
        if s.processing is not None and s.processing.active:
            s.processing.take(payload)
        return True

    async def _refuse_processing(self, s: _Session) -> None:
        why = (f"group {s.group.name} applies with a delay on {self.node} (apply_delay): its "
               "volumes are behind its journal, so it can neither make nor restore processed "
               "records (a via, or a processed link to it); remove the delay or the via")
        self.log.error("group %s: %s", s.group.name, why)
        await s.link.send(Error(code=Refusal.BAD_RECORDS, message=why))

    def _processing(self, s: _Session, local: list) -> Processing:
        p = Processing(s.group, local, self.log)

        def fail(why: str) -> None:
            s.failed = why
            asyncio.ensure_future(s.link.close())
        p.start(s.link.send, fail)
        return p

    async def _processed(self, s: _Session, ev: Processed) -> bool:
        """A far replica: journal the records of a relayed PROCESSED run, restored; a
        write whose base differs here is not taken (MISMATCH, and the session ends)."""
        g = s.group
        try:
            parts, last, mismatch = s.restoring.restore(ev)
        except ProcessedError as exc:
            self.log.error("group %s: processed records %d..%d from %s refused: %s",
                           g.name, ev.first_seq, ev.last_seq, s.link.who(s.source), exc)
            await s.link.send(Error(code=Refusal.BAD_RECORDS, message=str(exc)[:1000]))
            return False
        if parts and not await self._records(s, ev.first_seq, last, b"".join(parts)):
            return False
        if mismatch is None:
            return True
        rec = mismatch.record
        self.log.error("group %s: processed write from %s at seq %d not applied: %s; the "
                       "source resyncs the region", g.name, s.source, rec.seq, mismatch)
        await s.link.send(Mismatch(seq=rec.seq, volume=rec.volume, offset=rec.offset,
                                   length=rec.length))
        return False

    async def _apply_resync(self, s: _Session) -> None:
        """Apply what RESYNC_DATA arrived, in batches (one undo fdatasync and one
        volume fdatasync per batch), and report each batch durable with RESYNC_ACK."""
        while s.resync_items and s.failed is None:
            items, s.resync_items = s.resync_items, []
            try:
                await s.group.apply_resync(items)
            except Exception as exc:  # noqa: BLE001 - any failure ends this session cleanly
                self.log.error("group %s: resync write failed: %r", s.group.name, exc)
                s.failed = f"resync write failed: {exc}"
                try:
                    await s.link.send(Error(code=Refusal.INTERNAL, message=str(exc)[:1000]))
                finally:
                    await s.link.close()
                return
            s.resync_applied += len(items)
            await s.link.send(ResyncAck(count=s.resync_applied))

    async def _handover(self, s: _Session, ev: Handover) -> None:
        """Planned switchover: we hold every record through ev.seq; become the primary."""
        g = s.group
        try:
            await g.caught_up()
            held = None
        except GroupError as exc:  # held: an interrupted promote --at (window.py)
            held = str(exc)
        if held or g.commit.applied_seq != ev.seq or g.inconsistent:
            why = held or (f"handover at seq {ev.seq} but group {g.name} on {self.node} holds "
                           f"seq {g.commit.applied_seq}"
                           + (" and is inconsistent" if g.inconsistent else ""))
            self.log.error("group %s: %s", g.name, why)
            await s.link.send(Error(code=Refusal.HANDOVER_REFUSED, message=why))
            return
        targets = [TargetConfig(node=n, mode=m, compress=c, on_disconnect=d, interval=i)
                   for n, m, c, d, i in ev.targets if n != self.node]
        try:
            await self.promote(g, targets)
        except GroupError as exc:
            self.log.error("group %s: handover from %s refused: %s", g.name, s.source, exc)
            await s.link.send(Error(code=Refusal.HANDOVER_REFUSED,
                                    message=f"handover refused: {exc}"))
            return
        await s.link.send(Ack(seq=ev.seq, durable=ev.seq))
        self.log.warning("group %s: took over as primary from %s at seq %d (switchover)",
                         g.name, s.source, ev.seq)

    async def _successor(self, s: _Session, ev: Successor) -> bool:
        """Our source names the next primary (switchover): take it as source when it
        connects as the primary of the generation that begins after ev.seq."""
        g = s.group
        await g.commit.settle()
        why = self.admission.name_successor(g, ev)
        if why:
            self.log.warning("group %s: refused from %s: %s", g.name, s.link.who(s.source), why)
            await s.link.send(Error(code=Refusal.SUCCESSOR_REFUSED, message=why))
            return False
        self.log.warning("group %s: %s names %s the next primary after seq %d: %s becomes "
                         "the source when it connects as primary from seq %d", g.name,
                         s.source, ev.node, ev.seq, ev.node, ev.seq + 1)
        await s.link.send(Ack(seq=ev.seq, durable=ev.seq))
        return True

    async def _hash(self, s: _Session, ev: HashRequest) -> str | None:
        """Answer a HASH_REQUEST with the hashes of our regions (or say why we cannot).
        The stream is not read meanwhile, so for an in-band request (seq given) the
        volumes hold exactly the image after that seq while they are hashed."""
        g = s.group
        vol = g.volumes.get(ev.volume)
        if vol is None or ev.offset + ev.length > vol.size:
            return (f"hash request for {ev.volume!r} [{ev.offset}, +{ev.length}) which "
                    f"group {g.name} does not have")
        if ev.seq != ANY_SEQ:
            if g.commit.delayed:
                return (f"group {g.name} applies with a delay here (apply_delay): its volumes "
                        "are behind its journal, so they cannot be hashed at the stream's seq")
            try:
                await g.caught_up()
            except GroupError as exc:  # held: an interrupted promote --at (window.py)
                return f"group {g.name}: {exc}"
            if g.inconsistent:
                return f"group {g.name} is being resynced: no consistent image to hash"
            if g.commit.applied_seq != ev.seq:
                return (f"hash request at seq {ev.seq} but group {g.name} holds seq "
                        f"{g.commit.applied_seq}")
        hashes = await asyncio.get_running_loop().run_in_executor(
            None, volume_hashes, vol, ev.offset, ev.length, ev.granularity)
        if ev.offset + ev.length == vol.size:  # the end of a pass (see Volume.forget)
            vol.forget()
        await s.link.send(HashReply(id=ev.id, seq=g.commit.applied_seq, hashes=hashes))
        return None

    def _done(self, s: _Session, seq: int, err: int) -> None:
        """Records through `seq` are written to our journal (or failed)."""
        if err:
            s.failed = (f"journaling records through seq {seq} from {s.source} failed: "
                        f"{os.strerror(err)} (errno {err})")
            asyncio.ensure_future(s.link.close())
            return
        if seq > s.ack_seq:
            s.ack_seq = seq
        self._ack_soon(s)

    def _ack_soon(self, s: _Session) -> None:
        """Records were written, a commit made them durable or a FLUSH asked: one ACK
        (written and durable seq) for everything that happened in this turn of the loop.
        A sync write waits for it, so it is posted at once; only while the socket is
        backed up (the peer reads slowly) does the session's ACK task send it, after a
        drain, for everything that happened meanwhile."""
        if not s.ack_scheduled:
            s.ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._post_ack, s)

    def _post_ack(self, s: _Session) -> None:
        s.ack_scheduled = False
        if s.failed is not None:
            return
        if s.ack_wanted.is_set() or not s.link.can_post():
            s.ack_wanted.set()  # behind a drain: the task sends it
            return
        s.link.post(self._ack(s))

    @staticmethod
    def _ack(s: _Session) -> Ack:
        # Durable means in the image after a crash: through the last epoch boundary.
        return Ack(seq=s.ack_seq, durable=min(s.group.commit.consistent_seq, s.ack_seq))

    async def _acks(self, s: _Session) -> None:
        """The ACKs that wait for the socket to drain: one for everything that happened
        meanwhile (acks coalesce while the peer is slow to read them)."""
        while True:
            await s.ack_wanted.wait()
            s.ack_wanted.clear()
            if s.failed is not None:
                return
            try:
                await s.link.send(self._ack(s))
            except OSError:  # the link is gone: reading it ends the session
                return

    async def _reports(self, s: _Session) -> None:
        """Every REPORT_INTERVAL: this node's replication tree, to the source."""
        while s.failed is None:
            await asyncio.sleep(REPORT_INTERVAL)
            try:
                await s.link.send(Report(report=self.report(s.group)))
            except (OSError, LocalProtocolError):  # the link is gone, or its session over
                return

    def status(self, group: str) -> dict | None:
        s = self.sessions.get(group)
        if s is None:
            return None
        return {"source": s.source, "peer": s.link.peer, "acked_seq": s.ack_seq,
                "durable_seq": self._ack(s).durable}


def _who(link: Link | None, session: _Session | None) -> str:
    if link is None:
        return "a peer"
    return link.who(session.source if session else None)


def _merge(extents):
    """Sorted, coalesced (volume, offset, length) extents."""
    out: list[list] = []
    for volume, offset, length in sorted(extents):
        if out and out[-1][0] == volume and offset <= out[-1][1] + out[-1][2]:
            out[-1][2] = max(out[-1][2], offset + length - out[-1][1])
        else:
            out.append([volume, offset, length])
    return [tuple(e) for e in out]
