"""Epochs (DESIGN.md): a record with FLAG_OPEN is inside an epoch that goes on after it.
A replica journals such records as they come but applies them, and shows them to reads,
only once the record that closes their epoch is durable; its recovery replays through
the last epoch boundary; a promote drops an epoch that never closed. A watched primary
journals an epoch without writing its files."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.config import parse
from replicator.group import Group
from replicator.journal.record import (FLAG_OPEN, Kind, RecordError, decode, encode_header,
                                       iterate, rewritten)

SIZE = 1 << 20


def _record(seq: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return encode_header(seq, b"data", offset, len(data), Kind.WRITE, seq, data, flags) + data


def _group(tmp_path, role="secondary", capture="nbd", **options) -> Group:
    group = {"name": "db", "role": role, "journal_size": "16MiB", **options,
             "source": "q" if role == "secondary" else None,
             "volumes": [{"name": "data", "path": str(tmp_path / "d.img"), "size": SIZE,
                          "capture": capture}], "targets": []}
    cfg = parse({"node": "p", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": str(tmp_path / "state"), "tls": False,
                 "peers": {"q": "127.0.0.1:3"}, "groups": [group]})
    g = Group(cfg.group("db"), cfg.state_dir)
    g.open()
    return g


async def _receive(g: Group, records: list[bytes], first: int) -> None:
    """Submit one received batch and wait until it is durable."""
    fut = asyncio.get_running_loop().create_future()
    g.commit.submit_records(first, first + len(records) - 1, b"".join(records),
                            lambda err: fut.set_result(err))
    assert await fut == 0
    await g.commit.commit_now()


async def _epoch(g: Group, items: list, last: bool = True) -> int:
    """submit_epoch, awaited: its errno."""
    fut = asyncio.get_running_loop().create_future()
    g.commit.submit_epoch(items, fut.set_result, last=last)
    return await fut


def test_flags_and_skip_round_trip_and_strange_ones_are_corruption():
    rec = decode(_record(7, 4096, b"x" * 512, FLAG_OPEN))
    assert rec.flags == FLAG_OPEN and rec.kind is Kind.WRITE
    again = decode(b"".join(bytes(b) for b in rewritten(rec, 0)))
    assert (again.seq, again.offset, bytes(again.payload), again.flags) == (7, 4096, b"x" * 512, 0)
    skip = decode(b"".join(bytes(b) for b in rewritten(rec, FLAG_OPEN, skip=True)))
    assert (skip.kind, skip.seq, skip.length, skip.flags, skip.volume) == \
        (Kind.SKIP, 7, 0, FLAG_OPEN, "data")
    with pytest.raises(RecordError, match="flags 0x2") as exc:
        decode(_record(1, 0, b"y", flags=2))
    assert not exc.value.torn
    with pytest.raises(RecordError, match="kind 3, length 9"):
        decode(encode_header(1, b"data", 0, 9, Kind.SKIP, 0, b""))


@given(st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=64), st.booleans()),
                min_size=1, max_size=20))
def test_any_run_of_records_with_flags_decodes_as_written(specs):
    buf = b"".join(
        _record(i + 1, off * 512, data, FLAG_OPEN if open_ else 0) if data else
        encode_header(i + 1, b"data", 0, 0, Kind.SKIP, 0, b"", FLAG_OPEN if open_ else 0)
        for i, (off, data, open_) in enumerate(specs))
    got = list(iterate(buf))
    assert [r.seq for r in got] == list(range(1, len(specs) + 1))
    assert [bool(r.flags & FLAG_OPEN) for r in got] == [o for _, _, o in specs]
    assert [bytes(r.payload) for r in got] == [d for _, d, _ in specs]


def test_a_replica_applies_and_shows_an_epoch_only_once_it_closes(tmp_path):
    async def main():
        g = _group(tmp_path)
        g.start()
        vol = g.volumes["data"]
        try:
            await _receive(g, [_record(1, 0, b"a" * 4096, FLAG_OPEN),
                               _record(2, 8192, b"b" * 4096, FLAG_OPEN)], 1)
            assert g.commit.durable_seq == 2 and g.commit.consistent_seq == 0
            assert g.commit.applied_seq == 0
            assert vol.read(0, 4096) == bytes(4096)
            assert g.commit.read(vol, 0, 12288) == bytes(12288)  # reads see no half epoch
            # The closing record arrives in a batch that also opens the next epoch.
            await _receive(g, [_record(3, 0, b"c" * 4096), _record(4, 4096, b"d" * 4096,
                                                                   FLAG_OPEN)], 3)
            assert (g.commit.consistent_seq, g.commit.applied_seq) == (3, 3)
            assert vol.read(0, 12288) == b"c" * 4096 + bytes(4096) + b"b" * 4096
            assert g.commit.read(vol, 4096, 4096) == bytes(4096)
        finally:
            await g.stop()
    asyncio.run(main())


def test_the_end_of_an_epoch_is_made_durable_at_once(tmp_path):
    """A replica does not wait commit_interval to apply an epoch that closed: its end is
    a consistent point, like an application's flush (an NBD write's is not)."""
    async def main():
        g = _group(tmp_path, commit_interval=60)
        g.start()
        try:
            async def written(records, first):
                fut = asyncio.get_running_loop().create_future()
                g.commit.submit_records(first, first + len(records) - 1, b"".join(records),
                                        fut.set_result)
                assert await fut == 0
            await written([_record(1, 0, b"a" * 512)], 1)
            assert g.commit._commit_timer is not None  # a write of its own: commit_interval
            await written([_record(2, 0, b"b" * 512, FLAG_OPEN)], 2)
            await written([_record(3, 512, b"c" * 512)], 3)
            async with asyncio.timeout(5):
                while g.commit.applied_seq < 3:
                    await asyncio.sleep(0.01)
        finally:
            await g.stop()
    asyncio.run(main())


def test_recovery_replays_through_the_last_boundary_and_the_rest_of_the_epoch_follows(tmp_path):
    async def first():
        g = _group(tmp_path)
        g.start()
        await _receive(g, [_record(1, 0, b"a" * 4096), _record(2, 4096, b"b" * 4096, FLAG_OPEN)], 1)
        g.commit.halt("simulated crash")  # no clean stop: the journal is all there is
        await g.stop()

    async def second():
        g = _group(tmp_path)
        g.start()
        vol = g.volumes["data"]
        try:
            c = g.commit
            assert (c.durable_seq, c.consistent_seq, c.applied_seq) == (2, 1, 1)
            assert vol.read(0, 8192) == b"a" * 4096 + bytes(4096)
            assert g.journal.position(c.consistent_seq) == g.journal.position(1)
            # The source sends again from the boundary: held records are skipped.
            await _receive(g, [_record(2, 4096, b"b" * 4096, FLAG_OPEN),
                               _record(3, 8192, b"c" * 4096)], 2)
            assert (c.consistent_seq, c.applied_seq) == (3, 3)
            assert vol.read(0, 12288) == b"a" * 4096 + b"b" * 4096 + b"c" * 4096
        finally:
            await g.stop()
    asyncio.run(first())
    asyncio.run(second())


def test_a_promote_drops_an_epoch_that_never_closed(tmp_path):
    async def main():
        g = _group(tmp_path)
        g.start()
        try:
            await _receive(g, [_record(1, 0, b"a" * 4096), _record(2, 0, b"b" * 4096, FLAG_OPEN),
                               _record(3, 0, b"c" * 4096, FLAG_OPEN)], 1)
            gen = await g.promote(None, force=False)
            assert g.journal.last_seq == 1 and gen.first_seq == 2
            assert g.volumes["data"].read(0, 4096) == b"a" * 4096
            fut = asyncio.get_running_loop().create_future()
            g.commit.submit_write(g.volumes["data"], 0, b"n" * 4096, fut.set_result)
            assert await fut == 0
            await g.commit.commit_now()
            assert g.journal.last_seq == 2 and next(g.journal.records(1)).payload == b"n" * 4096
        finally:
            await g.stop()
    asyncio.run(main())
    reopened = _group(tmp_path, role="primary")
    assert reopened.journal.last_seq == 2  # the cut survived
    reopened.journal.close()


def test_a_watched_primary_journals_an_epoch_without_writing_its_file(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(b"f" * SIZE)  # what the program wrote

    async def main():
        g = _group(tmp_path, role="primary", capture="watch")
        g.start()
        vol = g.volumes["data"]
        try:
            assert g.watched
            assert await _epoch(g, [(vol, Kind.WRITE, 0, 4096, b"x" * 4096)], last=False) == 0
            assert (g.commit.durable_seq, g.commit.consistent_seq) == (1, 0)
            assert await _epoch(g, [(vol, Kind.ZERO, 4096, 4096, b"")]) == 0
            assert (g.commit.durable_seq, g.commit.consistent_seq, g.commit.applied_seq) == \
                (2, 2, 2)
            recs = list(g.journal.records(0))
            assert [(r.kind, r.flags) for r in recs] == [(Kind.WRITE, FLAG_OPEN), (Kind.ZERO, 0)]
            assert await _epoch(g, []) == 0  # nothing open: nothing to close
            assert g.journal.last_seq == 2
        finally:
            await g.stop()
        assert path.read_bytes() == b"f" * SIZE

    asyncio.run(main())


def test_an_empty_epoch_closes_one_left_open(tmp_path):
    async def main():
        g = _group(tmp_path, role="primary", capture="watch")
        g.start()
        vol = g.volumes["data"]
        try:
            assert await _epoch(g, [(vol, Kind.WRITE, 0, 512, b"x" * 512)], last=False) == 0
            assert await _epoch(g, []) == 0
            assert [r.kind for r in g.journal.records(0)] == [Kind.WRITE, Kind.SKIP]
            assert g.commit.consistent_seq == 2
            await g.demote("q")
            assert await _epoch(g, [(vol, Kind.WRITE, 0, 512, b"y" * 512)]) == errno.EROFS
        finally:
            await g.stop()
    os.makedirs(tmp_path, exist_ok=True)
    asyncio.run(main())
