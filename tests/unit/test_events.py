"""The event stream (events.py), its admin-socket streaming (admin.py) and the metrics'
own counters (metrics.py Histogram, IoStats)."""

from __future__ import annotations

import asyncio
import bisect
import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import admin, events
from replicator.events import Events
from replicator.metrics import LATENCY_BUCKETS, METRIC_NAMES, Histogram, IoStats


def test_seqs_are_contiguous_and_since_gives_what_follows():
    ev = Events()
    for i in range(5):
        ev.emit("state", "db", "s", state=f"s{i}")
    assert [e["seq"] for e in ev.since(0)] == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in ev.since(3)] == [4, 5]
    assert ev.since(5) == []
    assert ev.counts["state"] == 5


def test_trimmed_events_are_said_lost_never_skipped():
    ev = Events(keep=3)
    for _ in range(10):
        ev.emit("x")
    got = ev.since(2)
    assert got[0]["kind"] == "events_lost"
    assert (got[0]["first_seq"], got[0]["last_seq"]) == (3, 7)
    assert [e["seq"] for e in got[1:]] == [8, 9, 10]


@settings(max_examples=200, deadline=None)
@given(keep=st.integers(1, 20), n=st.integers(0, 60), since=st.integers(0, 70))
def test_since_accounts_for_every_seq_after_it(keep, n, since):
    ev = Events(keep=keep)
    for _ in range(n):
        ev.emit("x")
    covered = []
    for e in ev.since(since):
        if e["kind"] == "events_lost":
            covered.extend(range(e["first_seq"], e["last_seq"] + 1))
        else:
            covered.append(e["seq"])
    assert covered == list(range(since + 1, n + 1))


def test_details_may_not_shadow_an_event_field_and_odd_values_become_text():
    ev = Events()
    with pytest.raises(ValueError, match="seq"):
        ev.emit("resync_done", seq=4)
    assert ev.seq == 0  # nothing was emitted
    e = ev.emit("x", where=("a", 1), error=OSError(errno.EIO, "I/O error"))
    assert e["where"] == "('a', 1)" and "I/O error" in e["error"]


def test_a_follower_gets_every_event_even_after_falling_behind(monkeypatch):
    monkeypatch.setattr(events, "QUEUE", 4)  # a reader 4 events behind is cut off
    ev = Events(keep=100)

    async def run():
        got = []
        reader = ev.read(0, follow=True)
        ev.emit("first")
        got.append(await anext(reader))
        for _ in range(20):  # far more than its queue holds, while it does not read
            ev.emit("burst")
        while len(got) < 21:
            got.append(await asyncio.wait_for(anext(reader), 5))
        await reader.aclose()
        assert not ev._subscribers  # the reader's subscription went with it
        return got
    got = asyncio.run(run())
    assert [e["seq"] for e in got] == list(range(1, 22))


def test_a_seq_of_another_stream_is_said_lost_and_this_one_starts_over():
    ev = Events()
    for _ in range(3):
        ev.emit("x")

    async def first(n: int, **kw) -> list:
        reader = ev.read(**kw)
        got = [await anext(reader) for _ in range(n)]
        await reader.aclose()
        return got
    # A seq of the agent before its restart (another stream), or past this one's end.
    for kw in ({"since": 2, "stream": "0123456789ab"}, {"since": 7}):
        lost, *rest = asyncio.run(first(4, **kw))
        assert lost["kind"] == "events_lost" and "restarted" in lost["reason"]
        assert [e["seq"] for e in rest] == [1, 2, 3]
    got = asyncio.run(first(1, since=2, stream=ev.stream))
    assert [e["seq"] for e in got] == [3]


def test_admin_socket_streams_until_the_client_leaves(tmp_path):
    path = os.path.join(tmp_path, "admin.sock")
    ev = Events()

    async def stream(request):
        if request.get("since") == -1:
            raise admin.AdminError("since must be an event seq")
        async for e in ev.read(request.get("since", 0), request.get("follow", False)):
            yield e

    errors = []

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        server = admin.AdminServer(path, {}, streams={"events": stream})
        await server.start()
        try:
            ev.emit("a")
            ev.emit("b")
            listed = await asyncio.to_thread(lambda: list(admin.stream(path, "events")))
            assert [e["kind"] for e in listed] == ["a", "b"]
            with pytest.raises(admin.AdminError, match="since must be"):
                await asyncio.to_thread(lambda: list(admin.stream(path, "events", since=-1)))
            # Follow: a thread reads two new events, then leaves.
            got = []

            def follow():
                it = admin.stream(path, "events", since=2, follow=True)
                for e in it:
                    got.append(e)
                    if len(got) == 2:
                        it.close()
                        return
            reader = asyncio.ensure_future(asyncio.to_thread(follow))
            for _ in range(200):
                if ev._subscribers:
                    break
                await asyncio.sleep(0.01)
            ev.emit("c")
            ev.emit("d")
            await asyncio.wait_for(reader, 10)
            assert [e["kind"] for e in got] == ["c", "d"]
            for _ in range(200):  # the server notices the client left
                if not ev._subscribers:
                    break
                await asyncio.sleep(0.01)
            assert not ev._subscribers
        finally:
            await server.close()
    asyncio.run(run())
    assert errors == []  # a client leaving is no error (the generator ends cleanly)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 20, allow_nan=False), max_size=50))
def test_histogram_buckets_are_cumulative_and_count_every_observation(values):
    h = Histogram()
    for v in values:
        h.observe(v)
    buckets = h.buckets()
    assert buckets[-1] == ("+Inf", len(values))
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)
    for le, n in buckets[:-1]:
        assert n == sum(1 for v in values if v <= float(le))
    assert h.total == pytest.approx(sum(values))
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert all(bisect.bisect_left(LATENCY_BUCKETS, v) <= len(LATENCY_BUCKETS) for v in values)


def test_io_stats_count_only_what_succeeded():
    stats, results = IoStats(), []
    stats.write(4096, results.append)(0)
    stats.write(512, results.append)(errno.EIO)
    stats.flush(results.append)(0)
    assert results == [0, errno.EIO, 0]
    assert (stats.writes, stats.written_bytes, stats.flushes) == (1, 4096, 1)
    assert stats.write_latency.buckets()[-1][1] == 1
    assert stats.flush_latency.buckets()[-1][1] == 1


def test_metric_names_follow_prometheus_conventions():
    for name in METRIC_NAMES:
        assert name.startswith("replicator_")
        assert name == name.lower()
    assert "replicator_volume_writes_total" in METRIC_NAMES
    assert "replicator_target_lag_seconds" in METRIC_NAMES
