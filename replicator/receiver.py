"""Replication listener: accepts upstream senders and feeds their records into the
local replica group (which journals, applies in seq order and forwards downstream).

Per connection: HELLO is checked (protocol range, that this node is the target, that
the group exists here as a secondary and that the sender is its configured source),
then WELCOME reports the group's durable position. Each RECORDS batch goes to
Group.submit_records; HASH_REQUESTs are answered in stream order (online verify);
when a batch is durable (and acked by in-sync sync targets further
down a cascade) an ACK goes back. ACKs are coalesced: one per loop turn at most.
A newer connection for the same group replaces an older one (a half-dead link must not
block its own reconnection).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from .config import TargetConfig
from .generations import Generation, Relation, Verdict, compare
from .group import Group, GroupError
from .journal.segments import Position
from .transport import Link, peer_node
from .verify import volume_hashes
from .wire import (ANY_SEQ, PROTOCOL_MAX, PROTOCOL_MIN, SUPPORTED_FEATURES, Ack, Connection,
                   ConnectionClosed, Diverged, Error, Feature, Fetch, Handover, HashReply,
                   HashRequest, Heartbeat, Hello, LocalProtocolError, Records, Refusal, Refuse,
                   RemoteProtocolError, ResyncAck, ResyncData, ResyncDone, Retain, Role,
                   Welcome, negotiate)


class _Session:
    def __init__(self, link: Link, group: Group, source: str, history: list[Generation]):
        self.link = link
        self.group = group
        self.source = source
        self.history = history  # the sender's: ours once its image is ours
        self.ack_seq = 0
        self.ack_scheduled = False
        self.failed: str | None = None
        self.resync_items: list = []  # RESYNC_DATA received, not yet applied
        self.resync_applied = 0  # RESYNC_DATA frames durable, for RESYNC_ACK
        self.resync_task: asyncio.Task | None = None


class Receiver:
    def __init__(self, node: str, groups: dict[str, Group], *, heartbeat_timeout: float,
                 promote=None, superseded=None, tls: ssl.SSLContext | None = None,
                 log: logging.Logger | None = None):
        self.node = node
        self.promote = promote  # async (group, [TargetConfig]): HANDOVER makes us primary
        self.superseded = superseded  # async (group, node): a later primary's line is here
        self.groups = groups
        self.hb_timeout = heartbeat_timeout
        self.tls = tls
        self.log = log or logging.getLogger("replicator.receiver")
        self.sessions: dict[str, _Session] = {}
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True,
                                                  ssl=self.tls)

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        link = Link(reader, writer, Connection(Role.RECEIVER))
        session = None
        try:
            session = await self._handshake(link)
            if session:
                await self._serve(session)
        except (OSError, asyncio.TimeoutError) as exc:
            self.log.info("replication link from %s ended: %s", link.peer, exc or type(exc).__name__)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self.log.warning("protocol error from %s: %s", link.peer, exc)
        finally:
            if session and self.sessions.get(session.group.name) is session:
                del self.sessions[session.group.name]
            if session and session.resync_task is not None:
                session.failed = session.failed or "connection ended"
                await asyncio.gather(session.resync_task, return_exceptions=True)
            await link.close()
            self._conns.discard(task)

    async def _handshake(self, link: Link) -> _Session | None:
        ev = await link.next_event(self.hb_timeout)
        if isinstance(ev, ConnectionClosed):
            return None
        if not isinstance(ev, Hello):
            raise RemoteProtocolError(f"expected HELLO, got {type(ev).__name__}")
        agreed = negotiate(ev, PROTOCOL_MIN, PROTOCOL_MAX, SUPPORTED_FEATURES)
        group = self.groups.get(ev.group)
        refusal = None
        cert_node = peer_node(link.writer)
        if self.tls and cert_node != ev.node:
            refusal = (Refusal.IDENTITY, f"HELLO says node {ev.node!r} but its TLS "
                                         f"certificate is for {cert_node!r}")
        elif agreed is None:
            refusal = (Refusal.VERSION, f"protocol {ev.proto_min}..{ev.proto_max} not in "
                                        f"{PROTOCOL_MIN}..{PROTOCOL_MAX}")
        elif ev.target != self.node:
            refusal = (Refusal.WRONG_TARGET, f"this is node {self.node!r}, not {ev.target!r}")
        elif group is None:
            refusal = (Refusal.UNKNOWN_GROUP, f"no group {ev.group!r} on node {self.node}")
        elif agreed[1] & Feature.FETCH:
            await self._serve_fetch(link, ev, group, agreed)
            return None
        else:
            verdict = compare([Generation(*g) for g in ev.history], ev.seq, group.history,
                              group.journal.last_seq)
            if verdict.relation == Relation.SPLIT_BRAIN and group.survivor == ev.node:
                verdict = Verdict(Relation.DIVERGED, verdict.fork)  # resolve --discard-local
            if (group.role == "primary" and self.superseded is not None
                    and verdict.relation in (Relation.BEHIND, Relation.DIVERGED)):
                # An old primary back after a takeover: the sender's line went on from
                # ours, so it rejoins as its replica (what it wrote past the fork is saved,
                # then rolled back), like VVR's fast failback.
                self.log.warning("group %s: %s is primary of a later generation: this node "
                                 "was replaced and becomes its replica", group.name, ev.node)
                await self.superseded(group, ev.node)
            refusal = self._lineage(ev, group, verdict) or self._role(ev, group, verdict)
        if refusal:
            self.log.warning("refused %s from %s (%s): %s", ev.group, ev.node, link.peer, refusal[1])
            await link.send(Refuse(code=refusal[0], reason=refusal[1]))
            return None
        old = self.sessions.get(group.name)
        if old is not None:
            self.log.info("group %s: new connection from %s replaces the old one",
                          group.name, ev.node)
            old.failed = "replaced by a newer connection"
            await old.link.close()
        history = [Generation(*g) for g in ev.history]
        session = _Session(link, group, ev.node, history)
        self.sessions[group.name] = session
        await group.settle()
        pos = group.journal.position()
        version, features = agreed
        await link.send(Welcome(version=version, features=features, seq=pos.seq,
                                crc=pos.hcrc, node=self.node,
                                history=tuple((g.id, g.first_seq) for g in group.history)))
        if verdict.relation == Relation.DIVERGED and group.role == "bunker":
            # Records past the fork were never acknowledged on the new line; a bunker has
            # no volumes to roll back: the sender just restarts its journal at its position.
            self.log.warning("group %s: records %d..%d of this bunker are not on %s's line: "
                             "dropped", group.name, verdict.fork + 1, pos.seq, ev.node)
            await link.send(Diverged(fork=verdict.fork, complete=True))
        elif verdict.relation == Relation.DIVERGED:
            complete, extents = group.diverged_extents(verdict.fork)
            extents = _merge(extents)
            self.log.warning("group %s: records %d..%d here never reached %s's line: they "
                             "are rolled back by a resync of the regions they wrote",
                             group.name, verdict.fork + 1, pos.seq, ev.node)
            if not group.inconsistent:  # else saved before the resync began
                await self._keep_alive(link, group.save_diverged, verdict.fork,
                                       extents if complete else None)
            await link.send(Diverged(fork=verdict.fork, complete=complete,
                                     extents=tuple(extents)))
        else:
            group.adopt(history, ev.node)
        if group.split_brain and group.split_brain.get("peer") == ev.node:
            group.split_brain = None
        self.log.info("group %s: %s connected, resuming after seq %d", group.name, ev.node, pos.seq)
        return session

    async def _serve_fetch(self, link: Link, ev: Hello, group: Group, agreed) -> None:
        """A node of our line reads our journal after its position (takeover replay from a
        bunker): RECORDS from there to our last seq, then ACK(last seq)."""
        verdict = compare(group.history, group.journal.last_seq,
                          [Generation(*g) for g in ev.history], ev.seq)
        if verdict.relation not in (Relation.NEW, Relation.SAME, Relation.BEHIND):
            why = (f"{ev.node}'s history ({verdict.relation.value} after seq {verdict.fork}) is "
                   f"not a prefix of {self.node}'s: nothing here to replay onto it")
            self.log.warning("group %s: fetch from %s refused: %s", group.name, ev.node, why)
            await link.send(Refuse(code=Refusal.POSITION, reason=why))
            return
        await group.settle()
        pos = group.journal.position()
        await link.send(Welcome(version=agreed[0], features=agreed[1], seq=pos.seq, crc=pos.hcrc,
                                node=self.node,
                                history=tuple((g.id, g.first_seq) for g in group.history)))
        req = await link.next_event(self.hb_timeout)
        if not isinstance(req, Fetch):
            return
        j = group.journal
        if req.seq > pos.seq:  # it holds more than we do (records the primary never acked)
            await link.send(Ack(seq=pos.seq))  # it checks our last record against its own
            self.log.info("group %s: %s is at seq %d, past our %d: nothing to replay",
                          group.name, ev.node, req.seq, pos.seq)
            return
        held = j.position(req.seq)
        if held is None or held.hcrc != req.crc:
            why = (f"{self.node} does not hold {ev.node}'s position {req.seq} "
                   + ("(trimmed: the journal starts at seq "f"{j.first_seq})" if held is None
                      else "(its record differs)"))
            self.log.warning("group %s: fetch from %s: %s", group.name, ev.node, why)
            await link.send(Error(code=Refusal.POSITION, message=why))
            return
        seq, last = req.seq, pos.seq
        while seq < last:
            first, end, data = j.read(seq + 1, 1 << 20, last)
            await link.send(Records(first_seq=first, last_seq=end, payload=data,
                                    compress=bool(agreed[1] & Feature.ZSTD)))
            seq = end
        await link.send(Ack(seq=last))
        self.log.info("group %s: %s fetched records %d..%d", group.name, ev.node, req.seq + 1, last)

    async def _keep_alive(self, link: Link, func, *args):
        """Run func(*args) in a thread, sending heartbeats meanwhile."""
        fut = asyncio.get_running_loop().run_in_executor(None, func, *args)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=self.hb_timeout / 3)
            if done:
                return fut.result()
            await link.send(Heartbeat(sent_ns=0))

    def _lineage(self, ev: Hello, group: Group, verdict) -> tuple | None:
        """A refusal when the generation histories say the sender may not ship here."""
        if verdict.relation == Relation.SPLIT_BRAIN:
            group.split_brain = {"peer": ev.node, "fork": verdict.fork}
            self.log.error("group %s: SPLIT BRAIN with %s: both were primary after seq %d; "
                           "choose the survivor (replicator resolve on the other)",
                           group.name, ev.node, verdict.fork)
            return (Refusal.SPLIT_BRAIN, f"split brain: {ev.node} and {self.node} were both "
                                         f"primary of {group.name} after seq {verdict.fork}")
        if verdict.relation == Relation.STALE:
            return (Refusal.STALE, f"{self.node} descends from a later primary of {group.name} "
                                   f"than {ev.node} (forked after seq {verdict.fork}): "
                                   f"{ev.node} is no longer the primary; demote it")
        return None

    def _role(self, ev: Hello, group: Group, verdict) -> tuple | None:
        """A refusal when this node's role in the group does not take `ev.node` as source:
        a replica takes its source, or a node of a later line (a promoted replica)."""
        if group.role not in ("secondary", "bunker"):
            return (Refusal.NOT_REPLICA, f"group {ev.group} is {group.role} on {self.node}")
        if ev.node != group.source and verdict.relation not in (Relation.BEHIND,
                                                                 Relation.DIVERGED):
            return (Refusal.WRONG_SOURCE, f"group {ev.group} on {self.node} accepts "
                                          f"{group.source!r} as source, not {ev.node!r}")
        return None

    async def _serve(self, s: _Session) -> None:
        while s.failed is None:
            ev = await s.link.next_event(self.hb_timeout)
            if isinstance(ev, Records):
                try:
                    s.group.submit_records(ev.first_seq, ev.last_seq, ev.payload,
                                           lambda err, seq=ev.last_seq: self._done(s, seq, err))
                except GroupError as exc:
                    self.log.error("%s", exc)
                    await s.link.send(Error(code=Refusal.POSITION, message=str(exc)[:1000]))
                    return
            elif isinstance(ev, ResyncData):
                s.resync_items.append((ev.volume, ev.offset, ev.payload))
                if s.resync_task is None or s.resync_task.done():
                    s.resync_task = asyncio.create_task(self._apply_resync(s))
            elif isinstance(ev, ResyncDone):
                if s.resync_task is not None:
                    await s.resync_task
                if s.failed is not None:
                    break
                await s.group.finish_resync(Position(ev.seq, ev.crc))
                s.group.adopt(s.history, s.source)
                s.ack_seq = ev.seq
                await s.link.send(Ack(seq=ev.seq))
            elif isinstance(ev, Handover):
                await self._handover(s, ev)
                return
            elif isinstance(ev, HashRequest):
                problem = await self._hash(s, ev)
                if problem:
                    self.log.error("group %s: hash request from %s: %s", s.group.name,
                                   s.source, problem)
                    await s.link.send(Error(code=Refusal.POSITION, message=problem[:1000]))
                    return
            elif isinstance(ev, Retain):
                s.group.retain(ev.seq)
            elif isinstance(ev, Heartbeat):
                await s.link.send(Heartbeat(sent_ns=ev.sent_ns))
            elif isinstance(ev, Error):
                self.log.warning("group %s: %s reported %s: %s", s.group.name, s.source,
                                 ev.code.name, ev.message)
                return
            elif isinstance(ev, ConnectionClosed):
                return
        self.log.warning("group %s: link from %s closed: %s", s.group.name, s.source, s.failed)

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
                if not s.link.writer.is_closing():
                    s.link.writer.write(s.link.conn.send(
                        Error(code=Refusal.INTERNAL, message=str(exc)[:1000])))
                await s.link.close()
                return
            s.resync_applied += len(items)
            if not s.link.writer.is_closing():
                s.link.writer.write(s.link.conn.send(ResyncAck(count=s.resync_applied)))

    async def _handover(self, s: _Session, ev: Handover) -> None:
        """Planned switchover: we hold every record through ev.seq; become the primary."""
        g = s.group
        await g.settle()
        if g.applied_seq != ev.seq or g.inconsistent or self.promote is None:
            why = (f"handover at seq {ev.seq} but group {g.name} on {self.node} holds seq "
                   f"{g.applied_seq}" + (" and is inconsistent" if g.inconsistent else ""))
            self.log.error("group %s: %s", g.name, why)
            await s.link.send(Error(code=Refusal.POSITION, message=why))
            return
        targets = [TargetConfig(node=n, mode=m, compress=c, on_disconnect=d)
                   for n, m, c, d in ev.targets if n != self.node]
        try:
            await self.promote(g, targets)
        except GroupError as exc:
            self.log.error("group %s: handover from %s refused: %s", g.name, s.source, exc)
            await s.link.send(Error(code=Refusal.POSITION, message=f"handover refused: {exc}"))
            return
        await s.link.send(Ack(seq=ev.seq))
        self.log.warning("group %s: took over as primary from %s at seq %d (switchover)",
                         g.name, s.source, ev.seq)

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
            await g.settle()
            if g.inconsistent:
                return f"group {g.name} is being resynced: no consistent image to hash"
            if g.applied_seq != ev.seq:
                return (f"hash request at seq {ev.seq} but group {g.name} holds seq "
                        f"{g.applied_seq}")
        hashes = await asyncio.get_running_loop().run_in_executor(
            None, volume_hashes, vol, ev.offset, ev.length, ev.granularity)
        if ev.offset + ev.length == vol.size:  # the end of a pass (see Volume.forget)
            vol.forget()
        await s.link.send(HashReply(id=ev.id, seq=g.applied_seq, hashes=hashes))
        return None

    def _done(self, s: _Session, seq: int, err: int) -> None:
        if err:
            s.failed = f"applying records through seq {seq} failed (errno {err})"
            asyncio.ensure_future(s.link.close())
            return
        if seq > s.ack_seq:
            s.ack_seq = seq
        if not s.ack_scheduled:
            s.ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_ack, s)

    def _send_ack(self, s: _Session) -> None:
        s.ack_scheduled = False
        if s.failed is None and not s.link.writer.is_closing():
            s.link.writer.write(s.link.conn.send(Ack(seq=s.ack_seq)))

    def status(self, group: str) -> dict | None:
        s = self.sessions.get(group)
        if s is None:
            return None
        return {"source": s.source, "peer": s.link.peer, "acked_seq": s.ack_seq}


def _merge(extents):
    """Sorted, coalesced (volume, offset, length) extents."""
    out: list[list] = []
    for volume, offset, length in sorted(extents):
        if out and out[-1][0] == volume and offset <= out[-1][1] + out[-1][2]:
            out[-1][2] = max(out[-1][2], offset + length - out[-1][1])
        else:
            out.append([volume, offset, length])
    return [tuple(e) for e in out]
