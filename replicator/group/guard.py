"""The lag guard of a group: each target's max_lag_seconds / max_lag_bytes, and what
its `on_lag` does to the group's local writes while it nears or passes them.

Every INTERVAL, while some target has a limit, the guard looks at each such target that
is *streaming* (connected and fed from the journal: not away, not logging, not
resyncing). A target that is away is on_disconnect's business, not the guard's: its lag
is not judged, and one that was over leaves the guard's care (lag_under_limit, with
`streaming: false`). For a streaming one it compares Group.lag (records, bytes, seconds)
with the limits and keeps TargetLink.lag_over (the metric) current, with hysteresis:
over once the lag reaches a limit (as configured: the age of the oldest write it lacks
against max_lag_seconds, the journal bytes against max_lag_bytes), under again only
below HYSTERESIS of both, so that a
lag hovering at the limit does not flap. Each change is an event (lag_over_limit,
lag_under_limit) with the lag and the limits.

What the target's on_lag does to local writes (NBD writes and zeroes; records received
from upstream are never held, they are the source's to pace):
- alert: nothing; the event and the metric say it.
- block: while over, new writes wait, in order and uncompleted, before they get a
  seq (commit.py's admission queue), until it is under again (VVR's latency
  protection). Links.blocked_by names it meanwhile (status writes_blocked_by, metric
  replicator_group_writes_blocked).
- throttle: writes are admitted just fast enough to keep the target inside its limit,
  by this control law, evaluated each INTERVAL:
      D   the target's drain rate: bytes it acknowledged per second, smoothed
          (exponentially, time constant DRAIN_SMOOTHING; floored at DRAIN_FLOOR so a
          target that has been idle is not taken to drain nothing)
      L   its limit in bytes: min(max_lag_bytes, max_lag_seconds * D)
      f   how full it is: max(lag_seconds / max_lag_seconds, lag_bytes / L) (so the
          bytes it could not drain within max_lag_seconds count before they age)
      allowance (bytes admitted at once, until the next look) = max(0, L/2 - lag_bytes)
      rate  (bytes/s admitted on top of it)                   = D * min(1, 2 (1 - f))
  So up to half its limit a write goes at once (the allowance covers it) and the rate
  is what the target drains; from half the limit on the rate falls linearly to 0 at the
  limit, where the lag can only shrink; over it (lag_over) writes wait as with block.
  The equilibrium is a lag of about half the limit, whatever the link's speed, and no
  write ever gets a fixed sleep: each waits only until the bytes before it have room
  (a token bucket, Gate). With several such targets the strictest one governs.

Cost on the write path: Commit._queue_local checks one attribute (its admission queue,
None unless a switchover holds writes or a gate limits them); a group whose targets
have no limit never gets a gate, and alert-only or block targets only while over.
"""

from __future__ import annotations

import asyncio
import math
import time

from ..events import emit
from .links import TargetLink

INTERVAL = 0.1  # seconds between looks while some target has a limit
HYSTERESIS = 0.9  # a target over its limit is under again below this share of it
THROTTLE_FROM = 0.5  # share of the limit from which throttle slows writes
DRAIN_SMOOTHING = 1.0  # seconds: time constant of the drain rate's average
DRAIN_FLOOR = float(1 << 20)  # bytes/s assumed at least of a target (idle, just connected)


def limited(t: TargetLink) -> bool:
    return t.cfg.max_lag_seconds is not None or t.cfg.max_lag_bytes is not None


def share(t: TargetLink, lag_seconds: float, lag_bytes: int, limit_bytes: float) -> float:
    """How full the target is (1: at its limit): the larger of its lag's shares of
    max_lag_seconds and of `limit_bytes`."""
    f = 0.0
    if t.cfg.max_lag_seconds is not None:
        f = lag_seconds / t.cfg.max_lag_seconds
    if limit_bytes != math.inf:
        f = max(f, lag_bytes / limit_bytes if limit_bytes > 0 else math.inf)
    return f


def limit_bytes(t: TargetLink, drain: float) -> float:
    """The target's limit in bytes: max_lag_bytes, or what it drains in max_lag_seconds
    if that is less."""
    out = math.inf if t.cfg.max_lag_bytes is None else float(t.cfg.max_lag_bytes)
    if t.cfg.max_lag_seconds is not None:
        out = min(out, t.cfg.max_lag_seconds * max(drain, DRAIN_FLOOR))
    return out


def throttle(f: float, lag_bytes: int, limit: float, drain: float) -> tuple[float, float]:
    """The control law (module docstring): (allowance in bytes, rate in bytes/s) for a
    throttle target that is f full with lag_bytes behind, limit bytes (limit_bytes:
    finite, as it has a limit) and drain bytes/s."""
    if f >= 1.0:
        return 0.0, 0.0
    allowance = max(0.0, limit * THROTTLE_FROM - lag_bytes)
    rate = max(drain, DRAIN_FLOOR) * min(1.0, (1.0 - f) / (1.0 - THROTTLE_FROM))
    return allowance, rate


class Gate:
    """Admission of local writes by bytes: a token bucket holding `allowance` bytes,
    refilled at `rate` bytes/s; closed (rate 0, no allowance) holds every write."""

    def __init__(self):
        self.allowance = 0.0
        self.rate = 0.0
        self._at = time.monotonic()

    def set(self, allowance: float, rate: float) -> None:
        """A new look: the bytes that may go at once, and the rate after them. A debt
        (a large write that went on a small allowance) is carried over, not forgiven:
        else a write per look would pass whatever the rate."""
        now = time.monotonic()
        if self.rate > 0:
            self.allowance += (now - self._at) * self.rate
        self.allowance = min(self.allowance, 0.0) + allowance
        self.rate, self._at = rate, now

    def wait(self, nbytes: int) -> float:
        """Seconds until a write of `nbytes` may go (inf: until the next look); 0: it
        may go now, and its bytes are taken. A write larger than the bucket goes once
        the bucket is not empty (it leaves it in debt), so none waits forever."""
        now = time.monotonic()
        if self.rate > 0:
            self.allowance += (now - self._at) * self.rate
        self._at = now
        if self.allowance > 0 or (nbytes == 0 and self.rate > 0):
            self.allowance -= nbytes
            return 0.0
        # (a millisecond more, so that the timer never fires just short of it)
        return -self.allowance / self.rate + 1e-3 if self.rate > 0 else math.inf


class _Drain:
    """One target's drain rate (bytes it acknowledged per second, smoothed)."""
    __slots__ = ("rate", "at", "last_seq", "lag_bytes")

    def __init__(self, last_seq: int, lag_bytes: int):
        self.rate, self.at = 0.0, time.monotonic()
        self.last_seq, self.lag_bytes = last_seq, lag_bytes


class LagGuard:
    """The guard of one group (module docstring); the group runs `run` as one of its
    loops and calls `limits_changed` when its targets change."""

    def __init__(self, group):
        self.group = group
        self.gate = Gate()
        self.admitted_rate: dict[str, float] = {}  # throttle targets: rate now (status)
        self._drains: dict[str, _Drain] = {}
        self._changed = asyncio.Event()

    def limits_changed(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        while True:
            if any(limited(t) for t in self.group.targets.values()):
                self.look()
                await asyncio.sleep(INTERVAL)
            else:
                self.look()  # whatever an earlier limit left (lag_over, a gate) goes
                self._changed.clear()
                await self._changed.wait()

    def look(self) -> None:
        """Judge every limited target, set lag_over, and set (or drop) the gate."""
        g = self.group
        allowance, rate, gated = math.inf, math.inf, False
        seen = set()
        local = g.role == "primary"  # (elsewhere no local writes to hold: alert only)
        for t in g.targets.values():
            t.lag_holds = False
            if not limited(t) or not t.streaming:
                self._drains.pop(t.node, None)
                self.admitted_rate.pop(t.node, None)
                if t.lag_over:
                    _, lag_bytes, lag_seconds = g.lag(t)
                    self._flip(t, False, lag_seconds, lag_bytes, streaming=t.streaming)
                continue
            seen.add(t.node)
            _, lag_bytes, lag_seconds = g.lag(t)
            drain = self._drain(t, lag_bytes)
            configured = math.inf if t.cfg.max_lag_bytes is None else t.cfg.max_lag_bytes
            f = share(t, lag_seconds, lag_bytes, configured)  # the limits as configured
            over = f >= (HYSTERESIS if t.lag_over else 1.0)
            if over != t.lag_over:
                self._flip(t, over, lag_seconds, lag_bytes)
            t.lag_holds = local and over and t.cfg.on_lag != "alert"
            if not local:
                continue
            if t.cfg.on_lag == "block" and over:
                allowance, rate, gated = 0.0, 0.0, True
            elif t.cfg.on_lag == "throttle":
                limit = limit_bytes(t, drain)  # max_lag_seconds as bytes too (the law)
                f = 1.0 if over else share(t, lag_seconds, lag_bytes, limit)
                a, r = throttle(f, lag_bytes, limit, drain)
                self.admitted_rate[t.node] = r
                allowance, rate, gated = min(allowance, a), min(rate, r), True
        for node in set(self._drains) - seen:
            del self._drains[node]
        if gated:
            self.gate.set(allowance, rate)
            g.commit.set_gate(self.gate)
        else:
            g.commit.set_gate(None)

    def _drain(self, t: TargetLink, lag_bytes: int) -> float:
        """Update and return the target's smoothed drain rate: what it acknowledged
        since the last look (the lag it had, plus what was journaled since, minus the
        lag it has now)."""
        j = self.group.journal
        d = self._drains.get(t.node)
        if d is None:
            d = self._drains[t.node] = _Drain(j.last_seq, lag_bytes)
            return d.rate
        now = time.monotonic()
        dt = now - d.at
        if dt <= 0:
            return d.rate
        drained = max(0, d.lag_bytes + j.bytes_between(d.last_seq, j.last_seq) - lag_bytes)
        weight = 1.0 - math.exp(-dt / DRAIN_SMOOTHING)
        d.rate += (drained / dt - d.rate) * weight
        d.at, d.last_seq, d.lag_bytes = now, j.last_seq, lag_bytes
        return d.rate

    def _flip(self, t: TargetLink, over: bool, lag_seconds: float, lag_bytes: int,
              **extra) -> None:
        t.lag_over = over
        c = t.cfg
        emit("lag_over_limit" if over else "lag_under_limit", self.group.name, t.node,
             lag_seconds=round(lag_seconds, 3), lag_bytes=lag_bytes,
             max_lag_seconds=c.max_lag_seconds, max_lag_bytes=c.max_lag_bytes,
             on_lag=c.on_lag, **extra)
        self.group.log.warning(
            "group %s: target %s is %s its lag limit (lag %.3fs, %d bytes; max_lag_seconds "
            "%s, max_lag_bytes %s, on_lag %s)%s", self.group.name, t.node,
            "over" if over else "back under", lag_seconds, lag_bytes, c.max_lag_seconds,
            c.max_lag_bytes, c.on_lag, "" if extra.get("streaming", True) else
            " (it is not streaming: on_disconnect applies)")

    def status(self, t: TargetLink) -> dict | None:
        """The target's lag limit as status shows it (None: it has none)."""
        if not limited(t):
            return None
        c = t.cfg
        out = {"max_lag_seconds": c.max_lag_seconds, "max_lag_bytes": c.max_lag_bytes,
               "on_lag": c.on_lag, "over": t.lag_over}
        if c.on_lag == "throttle":
            rate = self.admitted_rate.get(t.node)
            out["admitted_bytes_per_second"] = None if rate is None else round(rate)
        return out
