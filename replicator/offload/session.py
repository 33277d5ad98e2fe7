"""The two ends of processing offload in a receiver session (seed 000).

Processing, on a near replica: for each far target its source asked for (OFFLOAD) and
each of this node's own targets that it processes (a cascade, claim 12), every record
received is processed against the replica's image before it (image.py, codec.py): the
runs go back to the source in PROCESSED frames, or into the local target's relay.

Restoring, on a far replica whose source agreed Feature.PROCESSED: a PROCESSED frame's
records are restored against this replica's image and journaled like RECORDS; a write
whose base differs here is never applied (BaseMismatch, the session reports it).

Both run on the event loop, in the receiver's order of frames; every record the
session takes, processed or not, is fed to its image, so the base of the next one is
right whatever the group has made visible to reads by then.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..group import Group
from ..journal.record import Kind
from ..wire import Offload, Processed
from .codec import (BaseMismatch, Op, Processor, ProcessedError, Restorer, load_key,
                    ops_names, raw_run)
from .image import Image
from .relay import Relay


RUN_GATHER = 0.005  # seconds a near node's run waits for more batches to join it


class _Job:
    """One batch to process: its records with their bases, read on the loop."""
    __slots__ = ("first", "last", "raw", "items", "sinks")

    def __init__(self, sinks: list):
        self.first = self.last = self.raw = 0
        self.items: list = []  # (head, record, base)
        self.sinks = sinks  # (far node name or local Relay, Processor)


class Processing:
    """Bases are read on the loop as records arrive (before the group shows them); the
    processing itself runs in a worker thread, one batch after another, so that the
    receiver acknowledges a sync write without waiting for it."""

    def __init__(self, group: Group, local: list[Relay], log: logging.Logger):
        self.group, self.log = group, log
        self.image = Image(group, group.commit.submitted_seq)
        self._upstream: dict[str, Processor] = {}  # far target -> processor (asked by source)
        self._local = [(relay, Processor(relay.ops, _key(group, relay.node, relay.ops)))
                       for relay in local]
        self._fed = group.commit.submitted_seq
        self._jobs: deque[_Job] = deque()  # taken, not processed yet, in seq order
        self._queued = asyncio.Event()
        self._worker: asyncio.Task | None = None
        for relay in local:
            relay.processing = True

    def ask(self, ev: Offload) -> Offload:
        """The source asks for records processed for the far target ev.target: our answer."""
        g = self.group
        why = ""
        if ev.ops & ~int(Op(15)) or not ev.ops:
            why = f"unknown processing ops {ev.ops:#x}"
        elif not g.volumes:
            why = f"{g.name} has no volumes on this node (a bunker) to process against"
        if not why:
            try:
                self._upstream[ev.target] = Processor(Op(ev.ops), _key(g, ev.target, ev.ops))
            except ValueError as exc:
                why = str(exc)
        if why:
            self.log.warning("group %s: will not process records for %s: %s", g.name,
                             ev.target, why)
            return Offload(target=ev.target, ops=0, reason=why[:1000])
        self.log.info("group %s: processing records for %s (%s)", g.name, ev.target,
                      ", ".join(ops_names(ev.ops)))
        return Offload(target=ev.target, ops=ev.ops)

    @property
    def active(self) -> bool:
        return bool(self._upstream or self._local)

    def start(self, send, fail) -> None:
        """Process taken batches in order; `send(frame)` (a coroutine) sends a PROCESSED
        frame to the source; `fail(why)` ends the session when processing fails."""
        self._worker = asyncio.create_task(self._work(send, fail),
                                           name=f"offload-{self.group.name}")

    async def close(self) -> None:
        for relay, _ in self._local:
            relay.processing = False
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    def take(self, payload) -> None:
        """Records just queued in the group (submit_records, in this same turn of the
        loop, so none of them is visible to reads yet): read their bases now and queue
        them for processing."""
        image = self.image
        image.settle()
        job = _Job(list(self._upstream.items()) + self._local) if image.valid else None
        for rec, head in raw_run(payload):
            if rec.seq <= self._fed:
                continue  # held already (a resent batch): fed when it first came
            if job is not None:
                base = image.base(rec) if rec.kind is Kind.WRITE else None
                job.items.append((head, rec, base))
                job.first, job.last = job.first or rec.seq, rec.seq
                job.raw += rec.size
            image.feed(rec)
            self._fed = rec.seq
        if job is not None and job.items:
            self._jobs.append(job)
            self._queued.set()

    async def _work(self, send, fail) -> None:
        while True:
            await self._queued.wait()
            # A run gathers what comes within RUN_GATHER: at a low write rate one batch
            # holds a write or two, and every run is a frame into the source and one out
            # to the far node (an async target: a few milliseconds do not matter to it).
            await asyncio.sleep(RUN_GATHER)
            self._queued.clear()
            while self._jobs:
                job = self._jobs.popleft()
                # what queued meanwhile goes as one run (unless an OFFLOAD came between)
                while self._jobs and self._jobs[0].sinks == job.sinks:
                    more = self._jobs.popleft()
                    job.items += more.items
                    job.last, job.raw = more.last, job.raw + more.raw
                try:
                    runs = await asyncio.to_thread(_process, job)
                except Exception as exc:  # noqa: BLE001 - a bug: loudly, and the session ends
                    self.log.exception("group %s: processing records %d..%d failed",
                                       self.group.name, job.first, job.last)
                    fail(f"processing records {job.first}..{job.last} failed: {exc!r}")
                    return
                for i, ((sink, _), run) in enumerate(zip(job.sinks, runs)):
                    if i == 0:  # what processing saves, for the replica's analytics
                        self.group.analytics.delta(job.raw, len(run))
                    if isinstance(sink, Relay):
                        sink.add(job.first, job.last, run)
                    else:
                        await send(Processed(target=sink, first_seq=job.first,
                                             last_seq=job.last, payload=run))


def _process(job: _Job) -> list[bytes]:
    """A worker thread: each sink's processed run of the job (one job at a time)."""
    out = []
    for _, proc in job.sinks:
        parts: list = []
        for head, rec, base in job.items:
            parts.extend(proc.process(head, rec, base))
        out.append(b"".join(parts))
    return out


class Restoring:
    def __init__(self, group: Group, node: str, log: logging.Logger):
        self.group = group
        self.image = Image(group, group.commit.consistent_seq)
        self._fed = group.commit.consistent_seq  # the last record the image has
        key, key_path = None, group.cfg.link_keys.get(node)
        if key_path:
            try:
                key = load_key(key_path)
            except ValueError as exc:  # encrypted records will be refused, saying so
                log.error("group %s: %s", group.name, exc)
        self._restorer = Restorer(key)

    def records(self, payload) -> None:
        """Feed a RECORDS batch of the session to the image (records it has already, sent
        again or restored from PROCESSED, are not laid over later ones)."""
        for rec, _ in raw_run(payload):
            if rec.seq > self._fed:
                self.image.feed(rec)
                self._fed = rec.seq

    def restore(self, ev: Processed) -> tuple[list, int, BaseMismatch | None]:
        """The journal bytes of ev's records, as buffers, through the last one that
        restores, that seq, and the BaseMismatch that stopped it there, or None. Raises
        ProcessedError for a run that is corrupt or not exactly first..last."""
        image = self.image
        image.settle()
        parts, pos, view = [], 0, memoryview(ev.payload)
        seq = ev.first_seq - 1
        try:
            while pos < len(view):
                rec, bufs, pos = self._restorer.restore(view, pos, image.base)
                if rec.seq != seq + 1:
                    raise ProcessedError(f"processed run {ev.first_seq}..{ev.last_seq}: seq "
                                         f"{rec.seq} after {seq}")
                seq = rec.seq
                image.feed(rec)
                self._fed = max(self._fed, seq)
                parts.extend(bufs)
        except BaseMismatch as exc:
            return parts, seq, exc
        if seq != ev.last_seq:
            raise ProcessedError(f"processed run {ev.first_seq}..{ev.last_seq} holds "
                                 f"{ev.first_seq}..{seq}")
        return parts, seq, None


def _key(group: Group, far: str, ops: int) -> bytes | None:
    """The link key of `far` when ops encrypt (ValueError naming what is missing)."""
    if not ops & Op.ENCRYPT:
        return None
    path = group.cfg.link_keys.get(far)
    if path is None:
        raise ValueError(f"no link key for {far} in group {group.name}'s link_keys on "
                         "this node (encrypt needs one)")
    return load_key(path)
