"""Journal record format and segment recovery."""

import os
import shutil

import pytest

from replicator.journal.record import (HEADER_SIZE, MAX_LENGTH, Kind, RecordError, decode, encode_header,
                                       iterate)
from replicator.journal.segments import Journal, JournalCorruptError, Position


def encode(seq, name=b"data", offset=0, payload=b"abc", kind=Kind.WRITE, length=None):
    length = len(payload) if length is None else length
    hdr = encode_header(seq, name, offset, length, kind, 1234, payload)
    return bytes(hdr) + (payload if kind == Kind.WRITE else b"")


def test_round_trip_and_size():
    buf = encode(7, b"log", 4096, b"x" * 5000)
    assert len(buf) == HEADER_SIZE + len(b"log") + 5000  # header, name, payload
    rec = decode(buf)
    assert (rec.seq, rec.volume, rec.offset, rec.length, rec.kind, rec.time_ns) == \
        (7, "log", 4096, 5000, Kind.WRITE, 1234)
    assert bytes(rec.payload) == b"x" * 5000 and rec.size == len(buf)
    zero = encode(8, b"log", 0, b"", Kind.ZERO, length=1 << 20)
    assert len(zero) == HEADER_SIZE + 3
    rec = decode(zero)
    assert rec.kind == Kind.ZERO and rec.length == 1 << 20 and bytes(rec.payload) == b""
    assert [r.seq for r in iterate(buf + zero)] == [7, 8]


@pytest.mark.parametrize("cut", range(0, 60, 1))
def test_truncation_at_every_offset_is_torn(cut):
    buf = encode(1, b"data", 0, b"0123456789" * 2)
    if cut >= len(buf):
        return
    with pytest.raises(RecordError) as exc:
        decode(buf[:cut])
    assert exc.value.torn


@pytest.mark.parametrize("where", ["magic", "seq", "length", "name", "payload"])
def test_corruption_is_not_torn(where):
    buf = bytearray(encode(1, b"data", 0, b"payload!"))
    pos = {"magic": 0, "seq": 9, "length": 25, "name": HEADER_SIZE + 1, "payload": -2}[where]
    buf[pos] ^= 0x40
    with pytest.raises(RecordError) as exc:
        decode(bytes(buf))
    assert not exc.value.torn


def test_zero_records_may_span_any_u32_length():
    rec = decode(encode(9, b"data", 0, b"", Kind.ZERO, length=(1 << 32) - 1))
    assert rec.kind == Kind.ZERO and rec.length == (1 << 32) - 1 and rec.size == HEADER_SIZE + 4
    with pytest.raises(ValueError, match="exceeds"):
        encode_header(1, b"data", 0, MAX_LENGTH + 1, Kind.WRITE, 0, b"")


def test_huge_length_is_rejected_before_reading():
    buf = bytearray(encode(1))
    buf[24:28] = (0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(RecordError, match="exceeds"):
        decode(bytes(buf))


def _fill(journal, first, count, size=100):
    bufs, sizes, crcs = [], [], []
    for seq in range(first, first + count):
        rec = encode(seq, b"data", seq * 512, bytes([seq % 256]) * size)
        bufs.append(rec)
        sizes.append(len(rec))
        crcs.append(decode(rec).hcrc)
    batch = journal.append(first, bufs, sizes, crcs)
    os.fdatasync(batch.fd)
    journal.commit(batch)


def test_append_read_reopen(tmp_path):
    j = Journal(str(tmp_path), capacity=16 << 20, segment_size=1 << 20)
    j.open()
    _fill(j, 1, 10)
    _fill(j, 11, 5)
    assert (j.first_seq, j.last_seq) == (1, 15)
    first, last, data = j.read(3, 10 ** 6)
    assert (first, last) == (3, 15)
    assert [r.seq for r in iterate(data)] == list(range(3, 16))
    first, last, data = j.read(3, 300)  # two whole records fit in 300 bytes
    assert (first, last) == (3, 4)
    first, last, _ = j.read(3, 1)  # always at least one record
    assert (first, last) == (3, 3)
    assert j.bytes_between(0, 15) == j.used_bytes
    pos = j.position()
    j.close()
    j2 = Journal(str(tmp_path), capacity=16 << 20)
    j2.open()
    assert j2.position() == pos and j2.first_seq == 1


def test_segments_roll_and_trim(tmp_path):
    j = Journal(str(tmp_path), capacity=16 << 20, segment_size=1 << 20)
    j.open()
    for i in range(6):
        _fill(j, 1 + i * 10, 10, size=50_000)  # ~500 KB per batch -> new segment every 2
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".seg")]) == 3
    last = j.position(20)
    gone = j.trim_through(25)  # only whole segments: 1..20 go
    assert len(gone) == 1 and j.base == last and j.first_seq == 21
    assert j.position(20) == last and j.position(19) is None
    j.delete(gone)
    assert not any(os.path.exists(p) for p in gone)
    j.close()
    j2 = Journal(str(tmp_path), capacity=16 << 20)
    j2.open()
    assert (j2.first_seq, j2.last_seq, j2.base) == (21, 60, last)


def test_segments_a_trim_let_go_of_are_removed_at_open_if_never_deleted(tmp_path):
    j = Journal(str(tmp_path), capacity=16 << 20, segment_size=1 << 20)
    j.open()
    for i in range(6):
        _fill(j, 1 + i * 10, 10, size=50_000)
    gone = j.trim_through(45)  # 1..20 and 21..40; a crash before delete()
    assert len(gone) == 2
    j.close()
    j2 = Journal(str(tmp_path), capacity=16 << 20)
    j2.open()
    assert (j2.first_seq, j2.last_seq) == (41, 60)
    assert not any(os.path.exists(p) for p in gone)


def _assert_cut(path, at: int, before: bytes) -> None:
    """The segment was cut back to its first `at` bytes."""
    after = open(path, "rb").read()
    assert after == before[:at], f"cut at {len(after)}, expected {at}"


def test_recovery_cuts_a_torn_tail_at_every_offset(tmp_path):
    j = Journal(str(tmp_path / "src"), capacity=16 << 20)
    j.open()
    _fill(j, 1, 3, size=40)
    seg = j._segments[-1].path
    j.close()
    bounds = [0] + [j._segments[-1].end_of(seq) for seq in (1, 2, 3)]
    data = open(seg, "rb").read()
    for cut in range(len(data) + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / os.path.basename(seg)).write_bytes(data[:cut])
        jj = Journal(str(d), capacity=4 << 20)
        jj.open()
        whole = max(k for k, b in enumerate(bounds) if b <= cut)
        assert jj.last_seq == whole, cut
        _assert_cut(d / os.path.basename(seg), bounds[whole], data)
        jj.close()
        shutil.rmtree(d)  # each holds its journal's reservation


def test_corrupt_record_reported_with_file_and_offset(tmp_path):
    j = Journal(str(tmp_path), capacity=16 << 20)
    j.open()
    _fill(j, 1, 3, size=40)
    seg = j._segments[-1].path
    rec_size = j._segments[-1].offsets[1]
    j.close()
    with open(seg, "r+b") as f:
        f.seek(rec_size + HEADER_SIZE + 4 + 10)  # payload of record 2
        f.write(b"\xff")
    with pytest.raises(JournalCorruptError) as exc:
        Journal(str(tmp_path), capacity=16 << 20).open()
    assert exc.value.path == seg and exc.value.offset == rec_size
    assert "payload checksum" in str(exc.value)


def test_failed_write_leaves_no_partial_batch(tmp_path):
    j = Journal(str(tmp_path), capacity=16 << 20)
    j.open()
    _fill(j, 1, 2)
    path = j._segments[-1].path
    at, before = j._segments[-1].size, open(path, "rb").read()
    with pytest.raises(TypeError):
        j.append(3, [b"partial-bytes", object()], [10], [0])
    _assert_cut(path, at, before)
    j.close()
    j2 = Journal(str(tmp_path), capacity=16 << 20)
    j2.open()
    assert j2.last_seq == 2
    assert j2.position(2) == Position(2, j2._segments[-1].hcrcs[-1])


def _two_segments(tmp_path):
    """Records 1..20 in two segments (a roll after 10), closed: their paths and where
    each of the first segment's records ends."""
    j = Journal(str(tmp_path), capacity=16 << 20, segment_size=1 << 20)
    j.open()
    for i in range(2):
        _fill(j, 1 + i * 10, 10, size=60_000)  # 600 KB per batch: one segment each
    paths = [s.path for s in j._segments]
    assert len(paths) == 2
    ends = [j._segments[0].end_of(seq) for seq in range(1, 11)]
    j.close()
    return paths, ends


def test_a_sector_that_never_reached_the_disk_ends_the_log(tmp_path):
    """A power loss leaves an unsynced record with sectors reading as zeroes (unwritten
    blocks), possibly with later sectors written: the log ends there, it is not corrupt."""
    j = Journal(str(tmp_path), capacity=16 << 20)
    j.open()
    _fill(j, 1, 3, size=2000)
    seg = j._segments[-1]
    path, second = seg.path, seg.offsets[1]
    j.close()
    with open(path, "r+b") as f:
        f.seek(second + 1024 - second % 512)  # a whole sector inside record 2
        f.write(bytes(512))
    before = open(path, "rb").read()
    j2 = Journal(str(tmp_path), capacity=16 << 20)
    j2.open()
    assert j2.last_seq == 1
    _assert_cut(path, second, before)


def test_a_torn_segment_ends_the_log_and_later_segments_go(tmp_path):
    """Batch 11..20 went to a new segment while 1..10's fdatasync was in flight: a power
    loss may keep the second and tear the first. Nothing after the tear was durable in
    order, so the log ends there and the later segment is removed."""
    (first, second), ends = _two_segments(tmp_path)
    os.truncate(first, ends[-1] - 100)
    before = open(first, "rb").read()
    j = Journal(str(tmp_path), capacity=16 << 20)
    j.open()
    assert j.last_seq == 9 and not os.path.exists(second)
    _assert_cut(first, ends[8], before)  # cut back to record 9


def test_a_segment_past_a_lost_tail_is_removed(tmp_path):
    (first, second), ends = _two_segments(tmp_path)
    os.truncate(first, ends[6])  # records 8..10 never reached the disk, whole
    j = Journal(str(tmp_path), capacity=16 << 20)
    j.open()
    assert j.last_seq == 7 and not os.path.exists(second)
    _fill(j, 8, 2)  # and the log goes on from there
    assert j.last_seq == 9


def test_damage_with_every_sector_holding_data_is_corruption_in_any_segment(tmp_path):
    (first, _), _ = _two_segments(tmp_path)
    with open(first, "r+b") as f:
        f.seek(100_000)
        b = f.read(1)
        f.seek(100_000)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(JournalCorruptError) as exc:
        Journal(str(tmp_path), capacity=16 << 20).open()
    assert exc.value.path == first and "checksum" in str(exc.value)


def test_chunks_and_records_read_a_range_across_segments(tmp_path):
    (first, second), _ = _two_segments(tmp_path)
    j = Journal(str(tmp_path), capacity=16 << 20, segment_size=1 << 20)
    j.open()
    spans = [(a, b) for a, b, _ in j.chunks(3, 15, max_bytes=200_000)]
    assert spans[0][0] == 4 and spans[-1][1] == 15
    assert all(b + 1 == a for (_, b), (a, _) in zip(spans, spans[1:]))  # gap-free
    assert spans[0][1] == 6 and (11, 13) in spans  # budget, and never across a segment
    assert [r.seq for r in j.records(17)] == [18, 19, 20]
    assert list(j.records(20)) == []
    j.close()
