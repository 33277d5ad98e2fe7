"""The agent's event stream: every change of state an operator may want to react to,
as one record with a sequence number, a wall-clock time, the group and target it
concerns and its details, e.g.
    {"seq": 17, "time": "2026-12-02T01:50:03.120Z", "kind": "state", "group": "db",
     "target": "dc2", "state": "replicating", "previous": "catching-up"}

Kinds (README "Events" lists them with their details): state (a target's shown state:
connecting, catching-up, replicating, logging, resyncing, ...), resync_started,
resync_progress, resync_done, verify, promoted, demoted, split_brain, lag_over_limit,
lag_under_limit, stalled, journal_nearly_full, journal_below_limit, epoch_applied,
config_reloaded, config_reload_refused, agent_started, agent_stopping.

Like logging, there is one stream per process (`emit` from anywhere): the agent is one
process, and what it emits is what its admin socket streams (`replicator events`). The
stream keeps the last KEEP events; a subscriber (admin.py) reads those after the seq
it names, then every new one as it is emitted, so `replicator status` (which shows the
last seq) followed by `replicator events --since SEQ --follow` misses nothing. What it
cannot have (trimmed away, or dropped because the subscriber read too slowly) is said in
an `events_lost` record with the seqs it lacks, never skipped silently.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import AsyncIterator

_PLAIN = (str, int, float, bool, type(None), list, dict)  # as JSON has them
_FIELDS = frozenset(("seq", "time", "kind", "group", "target"))  # every event's own
KEEP = 4096  # events kept for subscribers that start behind
QUEUE = 4096  # events a subscriber may fall behind before it is cut off


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class Subscription:
    """New events for one reader, in order; `lost` says it fell QUEUE events behind."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE)
        self.lost = False

    def put(self, event: dict) -> None:
        if self.lost:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lost = True

    async def get(self) -> dict:
        return await self.queue.get()


class Events:
    def __init__(self, keep: int = KEEP):
        self.seq = 0  # the last event's
        # This stream's name: seqs start again at 1 with each agent, and a reader that
        # names the stream its seq came from learns that it missed a restart.
        self.stream = uuid.uuid4().hex[:12]
        self.counts: collections.Counter = collections.Counter()  # kind -> events emitted
        self._kept: collections.deque = collections.deque(maxlen=keep)
        self._subscribers: set[Subscription] = set()

    def emit(self, kind: str, group: str | None = None, target: str | None = None,
             **details) -> dict:
        clash = _FIELDS.intersection(details)
        if clash:
            raise ValueError(f"event {kind}: details may not be named {sorted(clash)}")
        self.seq += 1
        event = {"seq": self.seq, "time": _now(), "kind": kind, "group": group,
                 "target": target, **{k: v if isinstance(v, _PLAIN) else str(v)
                                      for k, v in details.items()}}
        self.counts[kind] += 1
        self._kept.append(event)
        for sub in self._subscribers:
            sub.put(event)
        return event

    def since(self, seq: int) -> list[dict]:
        """The kept events after `seq`, led by an events_lost record when some of them
        were trimmed away already."""
        kept = [e for e in self._kept if e["seq"] > seq]
        first = kept[0]["seq"] if kept else self.seq + 1
        if seq + 1 < first and seq < self.seq:
            return [lost(seq + 1, first - 1)] + kept
        return kept

    async def read(self, since: int = 0, follow: bool = False,
                   stream: str | None = None) -> AsyncIterator[dict]:
        """The events after `since` (a seq of `stream`, this one if None), then (follow)
        each new one as it comes. A reader that falls QUEUE events behind starts over
        from the kept ones after the last it had, so it misses nothing the stream still
        keeps. A seq of another stream (the agent restarted since), or one this stream
        has not reached, starts with an events_lost record and then this stream's
        kept events from its start."""
        if (stream is not None and stream != self.stream) or since > self.seq:
            yield {**lost(since + 1, None), "reason": f"seq {since} is not of this stream "
                   f"({self.stream}): the agent restarted since; its events start at 1"}
            since = 0
        last = since
        while True:
            sub = Subscription()
            if follow:
                self._subscribers.add(sub)
            try:
                for event in self.since(last):
                    last = event["seq"] or event["last_seq"]
                    yield event
                while follow and not (sub.lost and sub.queue.empty()):
                    event = await sub.get()
                    if event["seq"] > last:
                        last = event["seq"]
                        yield event
            finally:
                self._subscribers.discard(sub)
            if not follow:
                return


def lost(first: int, last: int) -> dict:
    return {"seq": None, "time": _now(), "kind": "events_lost", "group": None, "target": None,
            "first_seq": first, "last_seq": last}


EVENTS = Events()
emit = EVENTS.emit
