"""Markers: the MARKER record (journal/record.py), a group's list of them
(group/markers.py) and taking one on a real group (Group.mark), including what a
restart after kill -9 finds."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import events
from replicator.config import parse
from replicator.group import Group, GroupError
from replicator.group import markers as markers_mod
from replicator.group.markers import Markers
from replicator.journal.record import Kind, RecordError, decode, encode_header
from replicator.shipping.epoch import epochs


def _marker(seq: int, name: str, consistent: int = 0, length: int = 0, flags: int = 0):
    return encode_header(seq, name.encode(), consistent, length, Kind.MARKER, 123, b"", flags)


def test_a_marker_record_round_trips_and_bad_ones_are_corrupt():
    rec = decode(_marker(7, "before-upgrade", 1))
    assert (rec.seq, rec.kind, rec.volume, rec.offset, rec.length) == \
        (7, Kind.MARKER, "before-upgrade", 1, 0)
    for bad in (_marker(7, "m", length=4), _marker(7, "m", consistent=2),
                _marker(7, "m", flags=1)):
        with pytest.raises(RecordError) as err:
            decode(bad)
        assert not err.value.torn


def _write(seq: int, offset: int, length: int):
    data = b"w" * length
    return decode(encode_header(seq, b"data", offset, length, Kind.WRITE, 1, data) + data)


def test_a_periodic_epoch_ends_at_every_marker_record():
    """Whatever the group's list of markers says: the records themselves split it, and
    a write the next epoch overwrites is not coalesced across a marker."""
    recs = [_write(1, 0, 4096), _write(2, 0, 4096), decode(_marker(3, "m1")),
            _write(4, 0, 4096), decode(_marker(5, "m2")), _write(6, 0, 4096),
            _write(7, 0, 4096)]
    parts = epochs(recs)
    assert [(last, list(skip)) for last, skip in parts] == \
        [(3, [1, 0, 0]), (5, [0, 0]), (7, [1, 0])]
    assert epochs([]) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.sampled_from(["a", "b", "c", "d"])),
                max_size=40), st.integers(0, 200))
def test_the_list_orders_by_seq_and_cuts_exactly(took, cut):
    saved = []
    ms = Markers("db", changed=lambda: saved.append(1))
    for seq, name in took:
        ms.took(seq, f"{name}{seq}", seq * 10, False)
    seqs = sorted({s for s, _ in took})
    assert [m.seq for m in ms] == seqs
    ms.cut(cut)
    assert [m.seq for m in ms] == [s for s in seqs if s <= cut]
    again = Markers("db", changed=lambda: None)
    again.load(ms.state())
    assert list(again) == list(ms)


def test_the_oldest_go_first_and_each_marker_is_one_event(monkeypatch):
    monkeypatch.setattr(markers_mod, "KEEP", 3)
    ms = Markers("db", changed=lambda: None)
    before = events.EVENTS.counts["marker"]
    for seq in range(1, 6):
        ms.took(seq, f"m{seq}", 0, False)
    ms.took(5, "m5", 0, False)  # the same marker noted again (a replay): no event
    assert [m.name for m in ms] == ["m3", "m4", "m5"]
    assert events.EVENTS.counts["marker"] - before == 5
    assert ms.named("m4").seq == 4 and ms.named("m1") is None and ms.status() == {"count": 3, "last": ms.named("m5").as_dict()}


def _group(tmp_path) -> Group:
    cfg = parse({"node": "p", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": str(tmp_path / "state"), "tls": False,
                 "peers": {"q": "127.0.0.1:3"},
                 "groups": [{"name": "db", "role": "primary", "journal_size": "16MiB",
                             "volumes": [{"name": "data", "path": str(tmp_path / "d.img"),
                                          "size": "1MiB"}], "targets": []}]})
    group = Group(cfg.group("db"), cfg.state_dir)
    group.open()
    return group


def test_a_marker_is_durable_when_mark_returns_and_a_crash_keeps_it(tmp_path):
    """The checkpoint that would have saved the list never ran (group.json as it was
    before the mark): the journal's MARKER record brings the marker back."""
    async def take() -> tuple:
        g = _group(tmp_path)
        g.start()
        done = asyncio.get_running_loop().create_future()
        g.commit.submit_write(g.volumes["data"], 0, b"x" * 4096, done.set_result)
        assert await done == 0
        before = open(g.checkpoint.path, "rb").read()
        marker = await g.mark("m1", consistent=True)
        with pytest.raises(GroupError, match="exists already"):
            await g.mark("m1", consistent=False)
        durable = g.commit.durable_seq
        for task in g._tasks:  # the agent dies here: no stop(), no last checkpoint
            task.cancel()
        with open(g.checkpoint.path, "wb") as f:
            f.write(before)
        return marker, durable
    marker, durable = asyncio.run(take())
    assert (marker.seq, marker.name, marker.consistent) == (2, "m1", True)
    assert durable >= marker.seq  # mark returned once the marker was durable
    g = _group(tmp_path)
    assert [(m.seq, m.name, m.consistent) for m in g.markers] == [(2, "m1", True)]
    assert g.volumes["data"].read(0, 4) == b"xxxx"
