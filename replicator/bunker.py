"""Takeover replay from a bunker: before a replica is promoted, it reads the records it
lacks from the bunker's journal (a synchronous copy of the lost primary's journal) and
journals and applies them in seq order, so no acknowledged write is lost (seed 002:
the staging log is this node's own journal, written before the volumes). The drill's
non-destructive takeover replays them into a snapshot of the replica instead.

One connection with Feature.FETCH: HELLO (our position and history), WELCOME (the
bunker's), FETCH(our seq, its header CRC), then RECORDS from the bunker up to its last
seq and ACK(last seq). `replay` is the reading side, `serve_fetch` the bunker's (the
receiver hands it a HELLO asking for FETCH once admission let the sender read).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

from .admission import welcome
from .generations import Relation, compare, from_wire, to_wire
from .group import Group, GroupError
from .snapshot import Snapshot
from .transport import Link
from .wire import (PROTOCOL_MAX, PROTOCOL_MIN, Ack, Connection, Error, Feature, Fetch, Hello,
                   Records, Refusal, Refuse, Role, Welcome, code_name)


FETCH_BYTES = 1 << 20  # journal bytes per RECORDS frame of a fetch


class BunkerError(Exception):
    """The bunker could not give us its records; the message says why."""


async def replay(group: Group, node: str, bunker: str, address: tuple[str, int], *,
                 timeout: float, tls: ssl.SSLContext | None = None,
                 into: Snapshot | None = None) -> dict:
    """Fetch and apply every record the bunker holds past ours (past the snapshot's,
    applied to it, with `into`); returns {bunker, from_seq, to_seq, replayed}."""
    host, port = address
    await group.commit.settle()
    ours = into.position if into else group.journal.position()
    history = into.history if into else group.lineage.history
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls,
                                    server_hostname=bunker if tls else None), timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
        raise BunkerError(f"bunker {bunker} at {host}:{port} is unreachable: "
                          f"{exc or type(exc).__name__}") from None
    link = Link(reader, writer, Connection(Role.SENDER))
    try:
        await link.send(Hello(proto_min=PROTOCOL_MIN, proto_max=PROTOCOL_MAX,
                              features=Feature.ZSTD | Feature.FETCH, node=node,
                              group=group.name, target=bunker, seq=ours.seq,
                              history=to_wire(history)))
        ev = await link.next_event(timeout)
        if isinstance(ev, Refuse):
            raise BunkerError(f"bunker {bunker} refused: {code_name(ev.code)}: "
                              f"{ev.reason}")
        if not isinstance(ev, Welcome) or not ev.features & Feature.FETCH:
            raise BunkerError(f"bunker {bunker} did not accept a fetch")
        welcome = ev
        await link.send(Fetch(seq=ours.seq, crc=ours.hcrc))
        replayed, last = 0, ours.seq
        failed: list[tuple[int, int]] = []  # (last seq of the batch, errno)
        while True:
            ev = await link.next_event(timeout)
            if isinstance(ev, Records):
                try:
                    if into:
                        into.apply(ev.first_seq, ev.last_seq, ev.payload)
                    else:
                        group.commit.submit_records(
                            ev.first_seq, ev.last_seq, ev.payload,
                            lambda err, seq=ev.last_seq: err and failed.append((seq, err)))
                except GroupError as exc:
                    raise BunkerError(f"records from bunker {bunker}: {exc}") from None
                replayed += ev.last_seq - max(ev.first_seq, last + 1) + 1
                last = ev.last_seq
            elif isinstance(ev, Ack):
                if ev.seq < ours.seq and not replayed:
                    _check_ahead(group, bunker, welcome)
                    break
                if ev.seq != last:
                    raise BunkerError(f"bunker {bunker} ended at seq {ev.seq} after sending "
                                      f"records through {last}")
                break
            elif isinstance(ev, Error):
                raise BunkerError(f"bunker {bunker}: {ev.message}")
            else:
                raise BunkerError(f"bunker {bunker} sent {type(ev).__name__} during a fetch")
        await group.commit.settle()
        if failed:
            seq, err = failed[0]
            raise BunkerError(f"journaling records through seq {seq} fetched from bunker "
                              f"{bunker} failed: {os.strerror(err)} (errno {err})")
        return {"bunker": bunker, "from_seq": ours.seq + 1, "to_seq": last,
                "replayed": replayed}
    finally:
        await link.close()


def _check_ahead(group: Group, bunker: str, welcome: Welcome) -> None:
    """We hold records past the bunker's last (the lost primary shipped them to us but
    never had them acknowledged): the bunker has nothing for us if its last record is
    ours too."""
    mine = group.journal.position(welcome.seq)
    if mine is not None and mine.hcrc != welcome.crc:
        raise BunkerError(f"bunker {bunker}'s record {welcome.seq} differs from ours: it is "
                          "not of our line")


async def serve_fetch(link: Link, hello: Hello, group: Group, agreed, *, node: str,
                      timeout: float, log: logging.Logger) -> None:
    """The bunker's side: a node of our line reads our journal after its position
    (takeover replay): RECORDS from there to our last seq, then ACK(last seq)."""
    verdict = compare(group.lineage.history, group.journal.last_seq, from_wire(hello.history),
                      hello.seq)
    if verdict.relation not in (Relation.NEW, Relation.SAME, Relation.BEHIND):
        why = (f"{hello.node}'s history ({verdict.relation.value} after seq {verdict.fork}) "
               f"is not a prefix of {node}'s: nothing here to replay onto it")
        log.warning("group %s: fetch from %s refused: %s", group.name, link.who(hello.node),
                    why)
        await link.send(Refuse(code=Refusal.POSITION, reason=why))
        return
    await group.commit.settle()
    ours = welcome(group, node, agreed)
    await link.send(ours)
    req = await link.next_event(timeout)
    if not isinstance(req, Fetch):  # its ERROR or EOF: TRANSITIONS allow nothing else here
        return
    j = group.journal
    if req.seq > ours.seq:  # it holds more than we do (records the primary never acked)
        # it checks our last record against its own
        await link.send(Ack(seq=ours.seq, durable=ours.seq))
        log.info("group %s: %s is at seq %d, past our %d: nothing to replay",
                 group.name, hello.node, req.seq, ours.seq)
        return
    held = j.position(req.seq)
    if held is None or held.hcrc != req.crc:
        why = (f"{node} does not hold {hello.node}'s position {req.seq} "
               + (f"(trimmed: the journal starts at seq {j.first_seq})" if held is None
                  else "(its record differs)"))
        log.warning("group %s: fetch from %s: %s", group.name, link.who(hello.node), why)
        await link.send(Error(code=Refusal.POSITION, message=why))
        return
    last = ours.seq
    for first, end, data in j.chunks(req.seq, last, max_bytes=FETCH_BYTES):
        await link.send(Records(first_seq=first, last_seq=end, payload=data,
                                compress=bool(agreed[1] & Feature.ZSTD)))
    await link.send(Ack(seq=last, durable=last))
    log.warning("group %s: %s fetched records %d..%d (takeover replay)", group.name,
                link.who(hello.node), req.seq + 1, last)
