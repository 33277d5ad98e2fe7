"""The points of a secondary's point-in-time window (group/window.py): the syntax
Window.resolve reads (`seq:`, `time:`, `marker:`, bare digits, ISO 8601 with Z, an
offset or none, `-15m`), resolved on a real Group with `retain` that received records
with known primary times; anything else is a GroupError that says what is wrong."""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import shutil
import tempfile
import time
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import snapshot
from replicator.group import Group, GroupError
from replicator.journal.record import FLAG_OPEN, Kind, encode_header
from tests.unit.test_epochs import _group  # a secondary Group of one 1 MiB volume

STEP = 30 * 10**9  # the primary journaled a record every 30 s
RECORDS = 20  # seqs 1..20; 9..11 are one epoch (9 and 10 FLAG_OPEN); 14 is marker "m14"
OPEN = (9, 10)


def _records(t0: int) -> list[bytes]:
    out = []
    for seq in range(1, RECORDS + 1):
        when = t0 + (seq - 1) * STEP
        if seq == 14:
            out.append(encode_header(seq, b"m14", 0, 0, Kind.MARKER, when, b""))
            continue
        data = bytes([seq]) * 512
        flags = FLAG_OPEN if seq in OPEN else 0
        out.append(encode_header(seq, b"data", seq * 4096, len(data), Kind.WRITE, when, data,
                                 flags) + data)
    return out


async def _submit(g: Group, first: int, records: list[bytes]) -> None:
    """One batch received from upstream, written and made durable."""
    fut = asyncio.get_running_loop().create_future()
    g.commit.submit_records(first, first + len(records) - 1, b"".join(records),
                            fut.set_result)
    assert await fut == 0
    await g.commit.commit_now()


async def _applied(g: Group, seq: int) -> None:
    """The applier's steps have brought the volumes to `seq`."""
    deadline = time.monotonic() + 10
    while g.commit.applied_seq < seq:
        assert time.monotonic() < deadline, f"applied only through {g.commit.applied_seq}"
        await asyncio.sleep(0.01)


def _in_window(tmp_path, check, t0: int | None = None) -> None:
    """check(group, t0) on a started secondary (retain 1h) holding the records."""
    if t0 is None:  # 20m10s ago .. 10m40s ago, on a whole second: no boundary near -15m
        t0 = (time.time_ns() // 10**9 - 1210) * 10**9

    async def main():
        g = _group(tmp_path, retain="1h")
        g.start()
        try:
            await _submit(g, 1, _records(t0))
            await _applied(g, RECORDS)
            done = check(g, t0)
            if asyncio.iscoroutine(done):
                await done
        finally:
            await g.stop()
    asyncio.run(main())


def _iso(ns: int, tz: timezone = timezone.utc) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz).isoformat()


def _seq_at(t0: int, when: int) -> int:
    """The last consistent seq of _records journaled at or before `when`."""
    seq = min(RECORDS, (when - t0) // STEP + 1)
    while seq in OPEN:
        seq -= 1
    return seq


def test_seqs_and_markers_name_points_inside_the_window(tmp_path):
    def check(g, t0):
        w = g.window
        assert w.low_seq == 0 and g.commit.consistent_seq == RECORDS
        for to in ("5", "seq:5"):
            point = w.resolve(to)
            assert (point.seq, point.time_ns, point.marker) == (5, t0 + 4 * STEP, None)
        for to in ("m14", "marker:m14", "14", "seq:14"):
            assert tuple(w.resolve(to)) == (14, t0 + 13 * STEP, "m14")
        assert w.resolve("11").seq == 11 and w.resolve("8").seq == 8  # an epoch's ends
        assert w.resolve("0").seq == 0 and w.resolve(str(RECORDS)).seq == RECORDS
        assert w.resolve("5").as_dict()["time"].endswith("Z")
    _in_window(tmp_path, check)


def test_a_seq_outside_the_window_or_inside_an_epoch_is_refused(tmp_path):
    def check(g, _):
        w = g.window
        for to in (str(RECORDS + 1), "seq:99999999999999999999999"):
            with pytest.raises(GroupError, match=r"outside group db's window here \(seq 0\.\.20"):
                w.resolve(to)
        for seq in OPEN:
            with pytest.raises(GroupError, match=f"seq {seq} is inside an epoch"):
                w.resolve(str(seq))
        with pytest.raises(GroupError, match="no marker 'nope' in group db"):
            w.resolve("nope")
        with pytest.raises(GroupError, match="no marker 'm9' in group db"):
            w.resolve("marker:m9")
    _in_window(tmp_path, check)


def test_an_epoch_still_open_is_past_the_windows_end(tmp_path):
    """Records durable here whose epoch has not closed yet: no point inside them, and a
    time after them names the last consistent seq before them."""
    async def check(g, t0):
        when = t0 + RECORDS * STEP
        data = b"x" * 512
        await _submit(g, RECORDS + 1, [encode_header(
            RECORDS + 1, b"data", 0, len(data), Kind.WRITE, when, data, FLAG_OPEN) + data])
        assert (g.commit.durable_seq, g.commit.consistent_seq) == (RECORDS + 1, RECORDS)
        with pytest.raises(GroupError, match=f"seq {RECORDS + 1} is outside"):
            g.window.resolve(str(RECORDS + 1))
        assert g.window.resolve(_iso(when + STEP)).seq == RECORDS
    _in_window(tmp_path, check)


def test_a_time_names_the_last_consistent_seq_at_or_before_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # naive times are this node's local time
    time.tzset()

    def check(g, t0):
        w = g.window
        ist = timezone(timedelta(hours=5, minutes=30))
        for offset, seq in ((0, 1), (STEP - 10**6, 1), (STEP, 2), (7 * STEP + 5 * 10**6, 8),
                            (9 * STEP, 8), (10 * STEP, 11), (13 * STEP, 14),
                            (19 * STEP, 20), (400 * STEP, 20)):
            when = t0 + offset
            utc = datetime.fromtimestamp(when / 1e9, timezone.utc)
            forms = [_iso(when).replace("+00:00", "Z"), _iso(when), _iso(when, ist),
                     "time:" + _iso(when), utc.astimezone(ist).replace(tzinfo=None).isoformat()]
            for to in forms:
                point = w.resolve(to)
                assert point.seq == seq == _seq_at(t0, when), (to, offset)
                assert point.time_ns == t0 + (seq - 1) * STEP
            assert w.resolve(forms[0]).marker == ("m14" if seq == 14 else None)
    try:
        _in_window(tmp_path, check)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_relative_time_counts_back_from_now(tmp_path):
    def check(g, t0):
        w = g.window
        for to, minutes in (("-15m", 15), ("time:-15m", 15), ("-0.25h", 15), ("-900s", 15),
                            ("-12m", 12), ("-0d", 0)):
            want = _seq_at(t0, time.time_ns() - int(minutes * 60e9))
            assert w.resolve(to).seq == want, to  # records 30 s apart: now moves less
    _in_window(tmp_path, check)


def test_a_time_before_the_window_is_refused_with_its_start(tmp_path):
    def check(g, t0):
        for to in (_iso(t0 - 10**6), "-1h", "-1d", "2001-01-01T00:00:00Z"):
            with pytest.raises(GroupError, match="is before group db's window here") as err:
                g.window.resolve(to)
            assert "None" not in str(err.value), "the message names the window's start"
    _in_window(tmp_path, check)


def test_the_window_start_time_is_not_after_its_first_record(tmp_path):
    """status's from_time and the 'before the window' message: seq 0's time is not
    known here, but it is not the time of a later record."""
    def check(g, t0):
        assert g.window.start_time_ns <= t0
    _in_window(tmp_path, check)


def test_unreadable_points_are_a_group_error_saying_what_is_expected(tmp_path):
    def check(g, _):
        w = g.window
        for to in ("2026-13-01", "time:yesterday", "time:", "time:-15x", "2026-12-02T25:00"):
            with pytest.raises(GroupError, match="as a time: expected ISO 8601"):
                w.resolve(to)
    _in_window(tmp_path, check)


def test_a_seq_that_is_not_a_number_is_a_group_error(tmp_path):
    def check(g, _):
        for to in ("seq:abc", "seq:", "seq:-1", "seq:1.5", "seq:\u00b2", "\u00b2", "seq"):
            with pytest.raises(GroupError, match="seq|marker"):
                g.window.resolve(to)
    _in_window(tmp_path, check)


def test_a_time_beyond_what_a_datetime_holds_is_before_or_after_the_window(tmp_path):
    def check(g, _):
        for to in ("0001-01-01T00:00:00+01:00", "-99999999999d", "9999-12-31T23:59:59-01:00"):
            try:
                assert g.window.resolve(to).seq == RECORDS
            except GroupError as exc:
                assert "before" in str(exc), exc
    _in_window(tmp_path, check)


def test_the_time_a_point_shows_names_that_point(tmp_path):
    """A point's time as status, events and snapshot.json show it (milliseconds) names
    that point again, although the primary's clock gave its record nanoseconds."""
    def check(g, _):
        w = g.window
        for to in ("m14", "5", "20"):
            point = w.resolve(to)
            assert w.resolve(point.as_dict()["time"]) == point, point.as_dict()
    _in_window(tmp_path, check, t0=(time.time_ns() // 10**9 - 1210) * 10**9 + 123_456_789)


_SYNTAX = st.one_of(
    st.text(max_size=30),
    st.builds(lambda p, v: p + v, st.sampled_from(["seq:", "time:", "marker:", "", "-"]),
              st.text(alphabet="0123456789-:.TZ+smhd ", max_size=30)),
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()),
    st.integers(-10**30, 10**30).map(str))


def test_any_point_text_resolves_or_is_a_group_error(tmp_path):
    """Whatever an operator types: a Point inside the window, or a GroupError."""
    def check(g, _):
        @settings(max_examples=400, deadline=None)
        @given(_SYNTAX)
        def resolve(to):
            try:
                point = g.window.resolve(to)
            except GroupError as exc:
                assert str(exc)
                return
            assert 0 <= point.seq <= RECORDS and point.seq not in OPEN
        resolve()
    _in_window(tmp_path, check)


def test_no_window_without_retain_or_delay(tmp_path):
    async def main():
        g = _group(tmp_path)
        g.start()
        await asyncio.sleep(0)  # its loops begin before stop() cancels them
        try:
            with pytest.raises(GroupError, match="retain / apply_delay are not set"):
                g.window.resolve("1")
        finally:
            await g.stop()
    asyncio.run(main())


@pytest.mark.parametrize("options", [
    pytest.param({"apply_delay": "15m"}, id="apply_delay"),
    pytest.param({"retain": "1h"}, id="retain"), pytest.param({}, id="neither")])
@pytest.mark.parametrize("name,offset", [(b"other", 0), (b"data", (1 << 20) - 100)],
                         ids=["unknown-volume", "past-the-end"])
def test_a_record_the_volumes_cannot_take_is_refused_when_received(tmp_path, options, name,
                                                                   offset):
    """Delayed or not: a record is checked against the volumes when it comes, not when
    the delay is over (the history's save and the volume write would fail then, with
    the record journaled, acked and passed on)."""
    async def main():
        g = _group(tmp_path, **options)
        g.start()
        await asyncio.sleep(0)  # its loops begin before stop() cancels them
        try:
            data = b"x" * 512
            with pytest.raises(GroupError, match="which it does not have"):
                g.commit.submit_records(1, 1, encode_header(1, name, offset, len(data),
                                                            Kind.WRITE, 1, data) + data,
                                        lambda err: None)
        finally:
            await g.stop()
    asyncio.run(main())


REGION = 64 << 10  # where the random records write (of the 1 MiB volume)
_op = st.tuples(st.sampled_from([Kind.WRITE] * 4 + [Kind.ZERO, Kind.MARKER]),
                st.integers(0, REGION - 1), st.integers(1, 9000), st.booleans(),
                st.booleans())  # kind, offset, length, FLAG_OPEN, ends a received batch


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=30), data=st.data())
def test_a_rewind_copy_at_any_consistent_seq_is_the_image_then(tmp_path, ops, data):
    """The real applier's steps and snapshot.rewind: records received in random batches
    and applied; a copy at a point drawn from the window equals the image after it."""
    model = bytearray(REGION)
    images, batches, batch, seq = {0: bytes(REGION)}, [], [], 0
    t0 = time.time_ns() - 60 * 10**9  # a minute ago: well inside retain
    for i, (kind, offset, length, open_, cut) in enumerate(ops):
        seq += 1
        length = min(length, REGION - offset)
        flags = FLAG_OPEN if open_ and kind is not Kind.MARKER and i < len(ops) - 1 else 0
        if kind is Kind.MARKER:
            batch.append(encode_header(seq, f"m{seq}".encode(), 0, 0, kind, t0 + seq, b""))
        else:
            payload = random.Random(seq).randbytes(length) if kind is Kind.WRITE else b""
            model[offset:offset + length] = payload or bytes(length)
            batch.append(encode_header(seq, b"data", offset, length, kind, t0 + seq,
                                       payload, flags) + payload)
        if not flags:
            images[seq] = bytes(model)
        if cut or i == len(ops) - 1:
            batches.append((seq - len(batch) + 1, batch))
            batch = []
    points = data.draw(st.lists(st.sampled_from(sorted(images)), min_size=1, max_size=3,
                                unique=True), label="points")
    where = tempfile.mkdtemp(dir=tmp_path)

    async def main():
        g = _group(pathlib.Path(where), retain="1h")
        g.start()
        try:
            for first, records in batches:
                await _submit(g, first, records)
            await _applied(g, seq)
            for point in points:
                copy = os.path.join(where, f"at{point}")
                manifest = await snapshot.rewind(g, copy, str(point))
                assert manifest["seq"] == point
                with open(os.path.join(copy, "data.img"), "rb") as f:
                    got = f.read()
                assert got[REGION:] == bytes(len(got) - REGION)
                assert got[:REGION] == images[point], f"rewind copy at seq {point}"
        finally:
            await g.stop()
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_delayed_replicas_rewind_copy_goes_forward_and_back(tmp_path):
    """apply_delay: the volumes stop at the last record the delay let through; a copy at
    a later point is the volumes plus the journal, at an earlier one the volumes minus
    the history."""
    now = time.time_ns()
    images, model = {}, bytearray(REGION)
    records = []
    for seq in range(1, 21):
        data = random.Random(seq).randbytes(3000)
        offset = seq * 1000 % (REGION - 3000)  # overlapping writes
        model[offset:offset + len(data)] = data
        images[seq] = bytes(model)
        when = now - (20 * 60 - seq) * 10**9 if seq <= 10 else now  # 1..10 are due
        records.append(encode_header(seq, b"data", offset, len(data), Kind.WRITE, when, data)
                       + data)

    async def main():
        g = _group(tmp_path, retain="1h", apply_delay="15m")
        g.start()
        try:
            await _submit(g, 1, records)
            await _applied(g, 10)
            assert g.commit.applied_seq == 10 and g.commit.consistent_seq == 20
            for point in (15, 20, 3):
                copy = str(tmp_path / f"at{point}")
                assert (await snapshot.rewind(g, copy, f"seq:{point}"))["seq"] == point
                with open(os.path.join(copy, "data.img"), "rb") as f:
                    assert f.read(REGION) == images[point], f"copy at seq {point}"
            assert g.commit.applied_seq == 10  # the copies did not hurry the volumes
        finally:
            await g.stop()
    asyncio.run(main())
