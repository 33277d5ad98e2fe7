"""Dirty-region bitmap: set, clear, iterate, persist; granule boundaries and the last
partial granule of a volume."""

import pytest

from replicator.bitmap import Bitmap, BitmapError

G = 64 << 10


def make(tmp_path, **volumes):
    return Bitmap(str(tmp_path / "t.bm"), volumes or {"data": 10 * G + 4096, "log": 3 * G})


def test_mark_straddling_granules(tmp_path):
    b = make(tmp_path)
    b.mark("data", G - 512, 1024)  # straddles regions 0 and 1
    b.mark("data", 5 * G, G)  # exactly region 5
    b.mark("log", 2 * G + 1, 1)
    assert [(v, r) for v, r, *_ in b.dirty()] == [("data", 0), ("data", 1), ("data", 5), ("log", 2)]
    assert b.count() == 4


def test_last_partial_granule(tmp_path):
    b = make(tmp_path)
    b.mark("data", 10 * G + 4000, 96)
    assert list(b.dirty()) == [("data", 10, 10 * G, 4096)]
    b.set_all()
    assert b.count() == 11 + 3
    assert b.dirty_bytes() == 10 * G + 4096 + 3 * G


def test_zero_length_marks_nothing(tmp_path):
    b = make(tmp_path)
    b.mark("data", 0, 0)
    assert b.count() == 0


def test_clear_respects_regions_marked_during_a_pass(tmp_path):
    b = make(tmp_path)
    b.mark("data", 0, 2 * G)
    b.begin_pass()
    b.mark("data", G, 10)  # written again while region 1 was in flight
    assert b.clear("data", 0) and not b.clear("data", 1)
    assert [r for _, r, *_ in b.dirty()] == [1]
    b.end_pass()
    assert b.clear("data", 1) and b.count() == 0


def test_every_region_set_again_during_a_pass_stays_dirty(tmp_path):
    """A resync asked for while a pass runs marks every region again (set_all): the
    acknowledgement of a region the pass sent before must not clear it."""
    b = make(tmp_path)
    b.mark("data", 0, G)
    b.begin_pass()
    b.set_all()
    assert not b.clear("data", 0)
    b.end_pass()
    assert b.clear("data", 0)


def test_persist_round_trip(tmp_path):
    b = make(tmp_path)
    b.mark("data", 3 * G, 5 * G)
    b.mark("log", 0, 1)
    b.through, b.active = 1234, True
    b.save()
    c = make(tmp_path)
    assert c.load()
    assert list(c.dirty()) == list(b.dirty()) and c.through == 1234 and c.active
    assert Bitmap(str(tmp_path / "none.bm"), {"data": G}).load() is False


def test_damaged_or_foreign_files_are_refused(tmp_path):
    b = make(tmp_path)
    b.mark("data", 0, 1)
    b.save()
    raw = bytearray((tmp_path / "t.bm").read_bytes())
    raw[20] ^= 1
    (tmp_path / "t.bm").write_bytes(bytes(raw))
    with pytest.raises(BitmapError, match="damaged"):
        make(tmp_path).load()
    b.save()
    with pytest.raises(BitmapError, match="configured"):
        Bitmap(str(tmp_path / "t.bm"), {"data": 20 * G}).load()
    with pytest.raises(BitmapError, match="granularity"):
        Bitmap(str(tmp_path / "t.bm"), {"data": 10 * G + 4096, "log": 3 * G}, 128 << 10).load()
