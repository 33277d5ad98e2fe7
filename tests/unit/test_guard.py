"""The lag guard (group/guard.py): its control law, its gate, and what on_lag does to
the writes of a real Group (its committer and guard running on the loop); the target's
position moves as its shipper would move it (connected, acked)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.config import parse
from replicator.events import EVENTS
from replicator.group import Group
from replicator.group.guard import (DRAIN_FLOOR, HYSTERESIS, THROTTLE_FROM, Gate, share,
                                    throttle)

KiB = 1 << 10
WRITE = 4 * KiB


# ---- the control law ---------------------------------------------------------------------
@given(f=st.floats(0, 3), g=st.floats(0, 3), lag=st.integers(0, 1 << 30),
       limit=st.floats(1, 1 << 30), drain=st.floats(0, 1 << 30))
def test_throttle_rate_falls_from_the_drain_rate_at_half_to_zero_at_the_limit(f, g, lag,
                                                                               limit, drain):
    allowance, rate = throttle(f, lag, limit, drain)
    full = max(drain, DRAIN_FLOOR)
    assert 0 <= rate <= full and allowance >= 0
    if f <= THROTTLE_FROM:
        assert rate == full  # admitted as fast as the target drains
    if f >= 1:
        assert (allowance, rate) == (0, 0)  # at the limit: held
    if f < g:
        assert throttle(g, lag, limit, drain)[1] <= rate  # fuller: never faster
    # what goes at once never takes the lag past half the limit
    assert lag + allowance <= max(lag, limit * THROTTLE_FROM) + 1e-6 * limit


@given(seconds=st.floats(0, 100), nbytes=st.integers(0, 1 << 30),
       max_s=st.none() | st.floats(0.1, 50), max_b=st.none() | st.integers(1, 1 << 30))
def test_share_is_the_fuller_of_the_two_limits(seconds, nbytes, max_s, max_b):
    class Cfg:
        max_lag_seconds, max_lag_bytes = max_s, max_b

    class T:
        cfg = Cfg

    f = share(T, seconds, nbytes, math.inf if max_b is None else float(max_b))
    want = max(seconds / max_s if max_s else 0.0, nbytes / max_b if max_b else 0.0)
    assert math.isclose(f, want)


@settings(deadline=None)
@given(allowance=st.integers(0, 1 << 20), sizes=st.lists(st.integers(0, 256 * KiB), max_size=40))
def test_a_closed_gate_lets_through_its_allowance_and_one_write_past_it(allowance, sizes):
    gate = Gate()
    gate.set(float(allowance), 0.0)
    went = 0
    for n in sizes:
        if gate.wait(n) > 0:
            assert gate.wait(n) == math.inf  # no rate: only the guard's next look opens it
            break
        went += n
    assert went <= allowance + max(sizes, default=0)


def test_an_open_gate_says_how_long_a_write_waits_for_its_bytes():
    gate = Gate()
    gate.set(10 * KiB, 100 * KiB)  # 10 KiB at once, then 100 KiB/s
    assert gate.wait(50 * KiB) == 0  # the bucket is not empty: it goes, leaving a debt
    wait = gate.wait(50 * KiB)
    assert 0.35 < wait < 0.45  # the debt of 40 KiB at 100 KiB/s, then it may go
    time.sleep(wait)
    assert gate.wait(50 * KiB) == 0


# ---- on real groups ----------------------------------------------------------------------
def primary(tmp_path, **limits) -> Group:
    cfg = parse({"node": "p", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": str(tmp_path / "state"), "tls": False,
                 "peers": {"q": "127.0.0.1:3"},
                 "groups": [{"name": "db", "role": "primary", "journal_size": "16MiB",
                             "volumes": [{"name": "data", "path": str(tmp_path / "d.img"),
                                          "size": "1MiB"}],
                             "targets": [{"node": "q", "mode": "async", **limits}]}]})
    g = Group(cfg.group("db"), cfg.state_dir)
    g.open()
    return g


@contextlib.asynccontextmanager
async def running(g: Group):
    g.start()
    try:
        async with asyncio.timeout(30):
            yield
    finally:
        await g.stop()


async def until(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def write(g: Group, done: list, i: int) -> None:
    vol = g.volumes["data"]
    g.commit.submit_write(vol, (i % 256) * WRITE, bytes([i % 251]) * WRITE,
                          lambda err, i=i: done.append((i, err)))


def streaming(g: Group) -> None:
    """Target q streams now, as its shipper says it (and has the guard look)."""
    g.targets["q"].connected = True
    g.guard.look()


async def over_the_limit(g: Group, n: int = 20) -> list:
    """q streams and acknowledges nothing while n writes go: over its 32 KiB limit,
    the writes completed; returns their (index, errno) list, for more to follow."""
    streaming(g)
    done: list = []
    for i in range(n):
        write(g, done, i)
    await until(lambda: g.targets["q"].lag_over, "lag over the limit")
    await until(lambda: len(done) == n, "the writes before it")
    return done


def events_since(seq: int, kind: str) -> list[dict]:
    return [e for e in EVENTS.since(seq) if e["kind"] == kind]


def test_no_limit_no_gate(tmp_path):
    """A group whose targets have no lag limit never queues a write for admission."""
    g = primary(tmp_path)

    async def main():
        async with running(g):
            streaming(g)
            done: list = []
            for i in range(50):
                write(g, done, i)
                assert g.commit._admission is None
            await until(lambda: len(done) == 50, "the writes")
            g.guard.look()
            assert g.commit._admission is None and g.commit.gate is None
            assert g.guard.status(g.targets["q"]) is None
    asyncio.run(main())


def test_block_holds_writes_in_order_while_over_and_lets_them_go_once_under(tmp_path):
    limit = 64 * KiB
    g = primary(tmp_path, max_lag_bytes=limit, on_lag="block")
    t = g.targets["q"]
    seq0 = EVENTS.seq

    async def main():
        async with running(g):
            streaming(g)  # (it acknowledges nothing yet)
            done: list = []
            i = 0
            while not t.lag_over:
                write(g, done, i)
                i += 1
                await asyncio.sleep(0.005)
                assert i < 1000, "the target never went over its limit"
            assert g.targets.blocked_by == ["q"]
            over = events_since(seq0, "lag_over_limit")
            assert len(over) == 1 and over[0]["target"] == "q"
            assert over[0]["lag_bytes"] >= limit and over[0]["on_lag"] == "block"
            status = g.guard.status(t)
            assert status == {"max_lag_seconds": None, "max_lag_bytes": limit,
                              "on_lag": "block", "over": True}
            await until(lambda: len(done) == i, "the writes admitted before the block")
            journaled = g.journal.last_seq
            for j in range(i, i + 20):  # these wait: no seq, not completed, not failed
                write(g, done, j)
            await asyncio.sleep(0.5)
            assert len(done) == i and g.journal.last_seq == journaled
            # The target catches up: under again below HYSTERESIS, the writes go, in order.
            t.acked(journaled, journaled)
            g.targets_changed()
            await until(lambda: len(done) == i + 20, "the held writes")
            assert [n for n, _ in done] == list(range(i + 20))
            assert all(err == 0 for _, err in done)
            assert not t.lag_over and g.targets.blocked_by == []
            under = events_since(seq0, "lag_under_limit")
            assert len(under) == 1 and under[0]["lag_bytes"] < HYSTERESIS * limit
    asyncio.run(main())


def test_alert_only_says_it(tmp_path):
    g = primary(tmp_path, max_lag_bytes=32 * KiB, on_lag="alert")
    t = g.targets["q"]
    seq0 = EVENTS.seq

    async def main():
        async with running(g):
            streaming(g)
            done: list = []
            for i in range(40):  # 160 KiB: far over the limit
                write(g, done, i)
            await until(lambda: t.lag_over, "lag over the limit")
            await until(lambda: len(done) == 40, "every write (alert holds none)")
            assert g.targets.blocked_by == [] and g.commit._admission is None
            assert len(events_since(seq0, "lag_over_limit")) == 1
    asyncio.run(main())


def test_throttle_keeps_the_lag_inside_the_limit_and_releases_as_the_target_drains(tmp_path):
    limit = 256 * KiB
    g = primary(tmp_path, max_lag_bytes=limit, on_lag="throttle")
    t = g.targets["q"]

    async def main():
        async with running(g):
            streaming(g)
            done: list = []
            n = 400  # 1.6 MiB, six times the limit, all at once
            for i in range(n):
                write(g, done, i)
            await asyncio.sleep(0.5)
            worst = g.lag(t)[1]
            assert 0 < len(done) < n  # some went, the rest wait
            assert worst <= limit  # never over: no lag_over, no hold needed
            assert not t.lag_over
            assert g.guard.status(t)["admitted_bytes_per_second"] is not None
            # The target drains what it has; more goes each time, lag stays inside.
            while len(done) < n:
                last = g.journal.last_seq
                t.acked(last, last)
                g.targets_changed()
                await asyncio.sleep(0.05)
                worst = max(worst, g.lag(t)[1])
            assert worst <= limit
            assert [i for i, _ in done] == list(range(n)) and all(e == 0 for _, e in done)
    asyncio.run(main())


def over_a_block_limit(tmp_path, then) -> None:
    """A group whose target q (max_lag_bytes 32 KiB, on_lag block) is over its limit,
    then `then(group, done)` (done: the writes so far, see over_the_limit)."""
    g = primary(tmp_path, max_lag_bytes=32 * KiB, on_lag="block")

    async def main():
        async with running(g):
            await then(g, await over_the_limit(g))
    asyncio.run(main())


def test_a_target_that_is_not_streaming_is_not_judged(tmp_path):
    """Away, its lag is on_disconnect's business: it leaves the guard's care and the
    writes the block held go."""
    seq0 = EVENTS.seq

    async def then(g, done):
        for i in range(20, 30):
            write(g, done, i)
        g.targets["q"].connected = False  # the link went down
        await until(lambda: len(done) == 30, "the held writes")
        under = events_since(seq0, "lag_under_limit")
        assert len(under) == 1 and under[0]["streaming"] is False
        assert not g.targets["q"].lag_over
    over_a_block_limit(tmp_path, then)


def test_a_switchover_hold_and_a_lag_gate_together(tmp_path):
    async def then(g, done):
        t = g.targets["q"]
        g.commit.hold_writes()
        for i in range(20, 25):
            write(g, done, i)
        g.commit.release_writes()  # the hold ends; the lag gate still holds them
        await asyncio.sleep(0.3)
        assert len(done) == 20
        g.commit.hold_writes()
        last = g.journal.last_seq
        t.acked(last, last)
        g.targets_changed()
        await until(lambda: not t.lag_over, "back under")
        await asyncio.sleep(0.3)
        assert len(done) == 20  # the switchover still holds them
        g.commit.release_writes()
        await until(lambda: len(done) == 25, "the writes")
        assert [i for i, _ in done] == list(range(25))
    over_a_block_limit(tmp_path, then)


def test_a_halted_group_fails_the_writes_a_gate_holds(tmp_path):
    async def then(g, done):
        write(g, done, 20)
        g.commit.halt("test: halted")
        write(g, done, 21)  # refused at once, not held
        assert done[20:] == [(20, errno.EIO), (21, errno.EIO)]
    over_a_block_limit(tmp_path, then)
