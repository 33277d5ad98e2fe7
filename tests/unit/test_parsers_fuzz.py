"""Property-based fuzzing of the parsers of bytes this node did not write (issue 22):
arbitrary bytes never crash a parser, never make it allocate what a length field claims
beyond the declared limits, and always end in the module's clean error (RecordError,
ProtocolError, BitmapError, UndoError, ConfigError, JournalError) or a clean close;
what is encoded decodes back. The coverage-guided run is fuzz/fuzz_parsers.py
(scripts/fuzz.sh, RELIABILITY.md); every crash it found is a regression test at the
end of this file, its input inline. (test_wire.py, test_config.py and
test_nbd_tls_options.py own the properties of single frame bodies, config mutations
and options before TLS; these add streams, files and the limits.)"""

from __future__ import annotations

import os
import struct
import tracemalloc

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import config as config_mod
from replicator.bitmap import Bitmap, BitmapError
from replicator.capture import nbd as N
from replicator.journal import record as R
from replicator.journal.segments import Journal, JournalCorruptError
from replicator.undo import UndoError, UndoLog
from replicator.wire import (HEADER_SIZE, MAX_SEQ, Ack, Connection, ConnectionClosed, Hello,
                             NEED_DATA, Records, Role, State, Welcome)
from replicator.wire.frames import (HEADER, HEADER_CRC_OFFSET, RemoteProtocolError,
                                    encode_body, encode_header)
from tests import nbd_fakes

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FILES = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
KIB = 1024


def _peak_of(fn) -> int:
    """Bytes fn() allocated at its peak (Python allocations, tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- wire: streams into the connection state machine ----------------------------------

MAX_FRAME = 64 * KIB


def _frame(event) -> bytes:
    flags, parts = encode_body(event, max_frame=MAX_FRAME)
    return bytes(encode_header(event.frame_type, flags, parts)) + b"".join(map(bytes, parts))


def _with_crcs(stream: bytes) -> bytes:
    """Both CRCs of every frame recomputed (the lengths as they stand), so that random
    bytes get past the checksums into the body decoders and the state machine."""
    out, pos = bytearray(), 0
    while len(stream) - pos >= HEADER_SIZE:
        magic, kind, flags, length, _, _ = HEADER.unpack_from(stream, pos)
        length = min(length, len(stream) - pos - HEADER_SIZE)
        body = stream[pos + HEADER_SIZE:pos + HEADER_SIZE + length]
        head = bytearray(HEADER.pack(magic, kind, flags, length, crc32c(body), 0))
        struct.pack_into("<I", head, HEADER_CRC_OFFSET, crc32c(head[:HEADER_CRC_OFFSET]))
        out += head + body
        pos += HEADER_SIZE + length
    return bytes(out + stream[pos:])


def _streaming(role: Role, features: int) -> Connection:
    hello = Hello(proto_min=3, proto_max=3, features=features, node="a", group="g",
                  target="b", seq=10)
    welcome = Welcome(version=3, features=features, seq=5, crc=0, node="b")
    conn = Connection(role, max_frame=MAX_FRAME)
    if role is Role.SENDER:
        conn.send(hello)
        conn.receive_data(_frame(welcome))
    else:
        conn.receive_data(_frame(hello))
    conn.next_event()
    if role is Role.RECEIVER:
        conn.send(welcome)
    return conn


_FRAME_HEADS = st.builds(
    lambda kind, flags, body: HEADER.pack(0x3252, kind, flags, len(body), 0, 0) + body,
    st.integers(0, 30) | st.integers(0, 255), st.sampled_from([0, 0, 1, 2]),
    st.binary(max_size=80))
_STREAMS = st.lists(_FRAME_HEADS | st.binary(max_size=40), max_size=8).map(b"".join)


@FAST
@given(role=st.sampled_from(list(Role)), features=st.integers(0, 7), stream=_STREAMS,
       crcs=st.booleans(), chunk=st.integers(1, 97), handshake=st.booleans())
def test_any_stream_ends_in_events_a_remote_error_or_a_clean_close(role, features, stream,
                                                                    crcs, chunk, handshake):
    """Random frames (their CRCs right or not) into either end, before or after the
    handshake, in random pieces, then EOF: every step gives an event, NEED_DATA,
    ConnectionClosed or RemoteProtocolError (and the connection is then in ERROR with an
    ERROR frame to send); the buffer never holds more than max_frame + 16 + a piece."""
    conn = _streaming(role, features) if handshake else Connection(role, max_frame=MAX_FRAME)
    if crcs:
        stream = _with_crcs(stream)
    try:
        for at in range(0, len(stream) + 1, chunk):
            piece = stream[at:at + chunk]
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                assert len(conn._buf) <= MAX_FRAME + HEADER_SIZE + chunk
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
            if not piece:
                assert isinstance(event, ConnectionClosed) and conn.state is State.CLOSED
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        assert conn.send_failure()


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_a_header_claiming_4_gib_is_refused_at_once_without_buffering(length):
    """A header whose own CRC holds and whose length claims up to 4 GiB: refused from the
    16 header bytes alone, nothing allocated for the body."""
    head = bytearray(HEADER.pack(0x3252, 4, 0, length, 0, 0))
    struct.pack_into("<I", head, HEADER_CRC_OFFSET, crc32c(head[:HEADER_CRC_OFFSET]))
    conn = _streaming(Role.RECEIVER, 0)

    def feed():
        conn.receive_data(bytes(head) + b"x" * 100)
        with pytest.raises(RemoteProtocolError, match="exceeds max_frame"):
            conn.next_event()
    assert _peak_of(feed) < 256 * KIB


@FAST
@given(first=st.integers(1, 6), count=st.integers(0, 3), payload=st.binary(max_size=300),
       compress=st.booleans(), chunk=st.integers(1, 200))
def test_records_and_acks_round_trip_through_both_ends(first, count, payload, compress,
                                                        chunk):
    """RECORDS (compressed or not, received in any pieces) arrive as sent, and the ACK
    back too; the WELCOME said seq 5, so the first RECORDS may start at 1..6."""
    sender, receiver = _streaming(Role.SENDER, 1), _streaming(Role.RECEIVER, 1)
    event = Records(first_seq=first, last_seq=first + count, payload=payload,
                    compress=compress)
    wire = sender.send(event)
    got = []
    for at in range(0, len(wire), chunk):
        receiver.receive_data(wire[at:at + chunk])
        while (ev := receiver.next_event()) is not NEED_DATA:
            got.append(ev)
    assert [(e.first_seq, e.last_seq, e.payload) for e in got] == [
        (event.first_seq, event.last_seq, payload)]
    sender.receive_data(receiver.send(Ack(seq=event.last_seq, durable=event.first_seq)))
    assert sender.next_event() == Ack(seq=event.last_seq, durable=event.first_seq)


# ---- journal records and recovery -------------------------------------------------------

_NAMES = st.text(min_size=1, max_size=20).map(str.encode).filter(lambda b: 0 < len(b) < 256)


@st.composite
def _records(draw):
    kind = draw(st.sampled_from(list(R.Kind)))
    payload = draw(st.binary(max_size=200)) if kind is R.Kind.WRITE else b""
    length = {R.Kind.WRITE: len(payload), R.Kind.ZERO: draw(st.integers(0, 2**32 - 1))}.get(
        kind, 0)
    offset = draw(st.integers(0, 1)) if kind is R.Kind.MARKER else draw(
        st.integers(0, 2**64 - 1))
    flags = 0 if kind is R.Kind.MARKER else draw(st.sampled_from([0, R.FLAG_OPEN]))
    return (draw(st.integers(0, 2**64 - 1)), draw(_NAMES), offset, length, kind,
            draw(st.integers(0, 2**64 - 1)), payload, flags)


@FAST
@given(_records(), st.binary(max_size=8), st.binary(max_size=8))
def test_a_record_round_trips_at_any_position(fields, before, after):
    seq, name, offset, length, kind, time_ns, payload, flags = fields
    raw = R.encode_header(seq, name, offset, length, kind, time_ns, payload, flags) + payload
    rec = R.decode(before + raw + after, len(before))
    assert (rec.seq, rec.volume, rec.offset, rec.length, rec.kind, rec.time_ns,
            bytes(rec.payload), rec.size, rec.flags) == (
        seq, name.decode(), offset, length, kind, time_ns, payload, len(raw), flags)
    assert b"".join(map(bytes, R.rewritten(rec, flags))) == raw


@FAST
@given(st.binary(max_size=300), st.integers(0, 8), st.booleans())
def test_any_bytes_decode_or_raise_record_error(buf, pos, fix):
    """RecordError (torn or not) and nothing else; trusted_extent stays inside buf."""
    if fix and len(buf) >= R.HEADER_SIZE:  # header CRC right: past it into the fields
        name_end = min(len(buf), R.HEADER_SIZE + buf[41])
        buf = buf[:4] + struct.pack("<I", crc32c(buf[8:name_end])) + buf[8:]
    pos = min(pos, len(buf))
    assert pos <= R.trusted_extent(buf, pos) <= len(buf)
    try:
        list(R.iterate(buf, pos))
    except R.RecordError as exc:
        assert isinstance(exc.torn, bool)
    try:
        R.decode_head(buf, pos)
    except R.RecordError:
        pass


@pytest.mark.parametrize("kind", [R.Kind.WRITE, R.Kind.ZERO])
def test_a_record_claiming_4_gib_allocates_nothing(kind):
    """A record whose header CRC holds and whose length says 4 GiB - 1: a WRITE is
    refused from the header (before any read), a ZERO (no payload) decodes; neither
    allocates its length."""
    head = bytearray(R.encode_header(1, b"data", 0, 2**32 - 1, R.Kind.ZERO, 0, b""))
    head[40] = kind
    struct.pack_into("<I", head, 4, crc32c(head[8:]))
    buf = bytes(head) + b"x" * 100

    def decode():
        if kind is R.Kind.WRITE:
            with pytest.raises(R.RecordError, match="exceeds"):
                R.decode(buf)
        else:
            assert R.decode(buf).length == 2**32 - 1
    assert _peak_of(decode) < 64 * KIB


def _valid_run(n: int) -> bytes:
    return b"".join(R.encode_header(seq, b"data", seq * 512, 16, R.Kind.WRITE, 0, b"p" * 16)
                    + b"p" * 16 for seq in range(1, n + 1))


@FILES
@given(n=st.integers(0, 4), tail=st.binary(max_size=700), cut=st.integers(0, 400))
def test_recovery_of_a_segment_with_any_tail(tmp_path_factory, n, tail, cut):
    """A segment of n good records, cut anywhere, then any bytes: the journal opens at a
    prefix of the good records (the rest a torn tail it cuts off) or raises
    JournalCorruptError; once opened it reads back what it indexed and reopens the same."""
    directory = str(tmp_path_factory.mktemp("journal"))
    good = _valid_run(n)
    data = good[:len(good) - min(cut, len(good))] + tail
    with open(os.path.join(directory, f"{1:020d}.seg"), "wb") as f:
        f.write(data)
    journal = Journal(directory, capacity=1 << 20, segment_size=1 << 20)
    try:
        journal.open()
    except JournalCorruptError as exc:
        assert exc.path.endswith(".seg") and 0 <= exc.offset <= len(data)
        return
    finally:
        journal.close()
    journal = Journal(directory, capacity=1 << 20, segment_size=1 << 20)
    journal.open()
    try:
        kept = list(journal.records(0))
        assert [r.seq for r in kept] == list(range(1, journal.last_seq + 1))
        assert os.path.getsize(os.path.join(directory, f"{1:020d}.seg")) == \
            sum(r.size for r in kept)
    finally:
        journal.close()


# ---- NBD: options and requests ----------------------------------------------------------

_OPT = struct.Struct(">QII")
_REQ = struct.Struct(">IHHQQI")


def _go(name: bytes, infos=()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


_GO_DATA = _OPT.pack(N.IHAVEOPT, N.Opt.GO, len(_go(b"data"))) + _go(b"data")
_OPTIONS = st.lists(st.one_of(
    st.builds(lambda o, d: _OPT.pack(N.IHAVEOPT, o, len(d)) + d,
              st.integers(0, 12) | st.integers(0, 2**32 - 1), st.binary(max_size=40)),
    st.builds(lambda o, n, i: _OPT.pack(N.IHAVEOPT, o, len(_go(n, i))) + _go(n, i),
              st.sampled_from([N.Opt.GO, N.Opt.INFO]),
              st.sampled_from([b"data", b"ro", b"", b"nope", b"\xff"]),
              st.lists(st.integers(0, 4), max_size=3)),
    st.binary(max_size=24)), max_size=6).map(b"".join)
_REQUESTS = st.lists(st.one_of(
    st.builds(lambda fl, cmd, off, ln, data: _REQ.pack(N.REQUEST_MAGIC, fl, cmd, 7, off, ln)
              + data, st.sampled_from([0, 0, 1, 2, 3, 0x8000]), st.integers(0, 7),
              st.sampled_from([0, 512, 1 << 20, 2**64 - 1]) | st.integers(0, 1 << 21),
              st.sampled_from([0, 16, 4096, 128 << 10, 2**32 - 1]) | st.integers(0, 300),
              st.binary(max_size=64)),
    st.binary(max_size=30)), max_size=8).map(b"".join)


@FAST
@given(prefix=st.sampled_from([b"", nbd_fakes.CLIENT_FLAGS, struct.pack(">I", 1),
                               struct.pack(">I", 7)]),
       options=_OPTIONS, enter=st.sampled_from([b"", _GO_DATA,
                                                _OPT.pack(N.IHAVEOPT, 1, 2) + b"ro"]),
       requests=_REQUESTS, chunk=st.integers(1, 5000), tls=st.booleans(),
       deferred=st.booleans(), turns=st.booleans())
def test_any_client_bytes_end_in_replies_or_a_clean_close(prefix, options, enter, requests,
                                                          chunk, tls, deferred, turns):
    """Any handshake and requests, in any pieces, exports completing at once or later:
    the server never logs an internal error, never asks an export for bytes out of range
    (MemoryExport asserts), never writes after closing; every reply it writes is framed."""
    log, errors = nbd_fakes.make_logger()
    transport, conn, _ = nbd_fakes.drive(prefix + options + enter + requests, chunk=chunk,
                                         tls=tls, deferred=deferred, turns=turns, log=log)
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert transport.out.startswith(struct.pack(">QQH", N.NBDMAGIC, N.IHAVEOPT, 3))


@pytest.mark.parametrize("length", [2**32 - 1, (128 << 10) + 1])
def test_a_write_claiming_4_gib_is_refused_without_allocating_it(length):
    """A WRITE whose length passes max_request: EINVAL and closed (the payload cannot be
    skipped), and no buffer of its length is ever made."""
    log, errors = nbd_fakes.make_logger()
    stream = (nbd_fakes.CLIENT_FLAGS + _GO_DATA
              + _REQ.pack(N.REQUEST_MAGIC, 0, 1, 9, 0, length) + b"w" * 1000)
    out = {}
    assert _peak_of(lambda: out.update(r=nbd_fakes.drive(stream, log=log))) < 2 << 20
    transport, conn, _ = out["r"]
    assert transport.out.endswith(struct.pack(">IIQ", N.SIMPLE_REPLY_MAGIC, 22, 9))
    assert transport.closed and not errors.records


def test_an_option_claiming_4_gib_closes_without_reading_it():
    log, errors = nbd_fakes.make_logger()
    stream = nbd_fakes.CLIENT_FLAGS + _OPT.pack(N.IHAVEOPT, 3, 2**32 - 1) + b"x" * 1000
    out = {}
    assert _peak_of(lambda: out.update(r=nbd_fakes.drive(stream, log=log))) < 2 << 20
    assert out["r"][0].closed and not errors.records


# ---- config -----------------------------------------------------------------------------

_YAMLISH = st.lists(st.sampled_from([
    "node: a\n", "listen: 127.0.0.1:7801\n", "groups:\n", "  - name: g\n", "    volumes:\n",
    "      - {name: v, path: /v, size: 1MiB}\n", "peers: {b: 127.0.0.1:1}\n", "state_dir: /s\n",
    "[", "{", "]", "}", "&a ", "*a ", "!!python/object:os.system ", "- ", ": ", "\t", "'", '"',
    "9" * 5000, "1e999", "0x", "~\n", "\x00", "\xff",
]), max_size=20).map("".join)


@FILES
@given(st.one_of(st.binary(max_size=300), _YAMLISH.map(lambda s: s.encode("utf-8",
                                                                          "surrogatepass"))))
def test_any_config_file_loads_or_raises_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "replicator.yml"
    path.write_bytes(raw)
    try:
        config_mod.load(str(path))
    except config_mod.ConfigError as exc:
        assert exc.errors and all(isinstance(p, str) and m for p, m in exc.errors)


# ---- bitmap and undo log ----------------------------------------------------------------

@FILES
@given(volumes=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(1, 1 << 22),
                               min_size=1, max_size=3),
       marks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 22),
                                st.integers(0, 1 << 20)), max_size=8),
       granularity=st.sampled_from([4096, 65536]), through=st.integers(0, 2**64 - 1),
       active=st.booleans())
def test_a_bitmap_round_trips(tmp_path_factory, volumes, marks, granularity, through, active):
    path = str(tmp_path_factory.mktemp("bm") / "t.bm")
    bm = Bitmap(path, volumes, granularity)
    names = sorted(volumes)
    for i, offset, length in marks:
        bm.mark(names[i % len(names)], offset, length)
    bm.through, bm.active = through, active
    bm.save()
    again = Bitmap(path, volumes, granularity)
    assert again.load()
    assert list(again.dirty()) == list(bm.dirty())
    assert (again.through, again.active) == (through, active)


@FILES
@given(body=st.binary(max_size=200), fix=st.booleans())
def test_any_bitmap_file_loads_or_raises_bitmap_error(tmp_path_factory, body, fix):
    path = tmp_path_factory.mktemp("bm") / "t.bm"
    path.write_bytes(body + struct.pack("<I", crc32c(body)) if fix else body)
    bm = Bitmap(str(path), {"data": 1 << 20}, 4096)
    try:
        assert bm.load()
    except BitmapError:
        return
    assert len(bm.bits["data"]) == 32


_ENTRIES = st.lists(st.tuples(st.text(min_size=1, max_size=8), st.integers(0, 2**64 - 1),
                              st.binary(max_size=100)), max_size=6)


@FILES
@given(entries=_ENTRIES, torn=st.integers(0, 200))
def test_undo_entries_round_trip_and_a_torn_tail_is_cut(tmp_path_factory, entries, torn):
    """Entries saved (a region once: the first save of it wins) read back newest first
    after a reopen, also when a crash left a prefix of one more entry behind them."""
    path = str(tmp_path_factory.mktemp("undo") / "resync.undo")
    log = UndoLog(path)
    log.open()
    log.save(entries)
    log.close()
    seen, unique = set(), []
    for volume, offset, old in entries:
        if (volume, offset) not in seen:
            seen.add((volume, offset))
            unique.append((volume, offset, old))
    size = os.path.getsize(path)
    extra = struct.pack("<4sHQII", b"RUN1", 4, 1, 100, crc32c(b"n" * 100)) + b"more" + b"n" * 100
    with open(path, "ab") as f:
        f.write(extra[:min(torn, len(extra) - 1)])
    log = UndoLog(path)
    log.open()
    try:
        assert list(log.entries_newest_first()) == unique[::-1]
        assert log.saved == seen and os.path.getsize(path) == size
    finally:
        log.close()


@FILES
@given(body=st.binary(max_size=200), fix=st.booleans())
def test_any_undo_file_opens_or_raises_undo_error(tmp_path_factory, body, fix):
    if fix and len(body) >= 22:
        n, length = struct.unpack_from("<HxxxxxxxxI", body, 4)
        old = body[22 + n:22 + n + length]
        body = body[:18] + struct.pack("<I", crc32c(old)) + body[22:]
    path = tmp_path_factory.mktemp("undo") / "resync.undo"
    path.write_bytes(body)
    log = UndoLog(str(path))
    try:
        log.open()
        for volume, offset, old in log.entries_newest_first():
            assert isinstance(volume, str)
    except UndoError:
        pass
    finally:
        log.close()


def test_an_undo_entry_claiming_4_gib_is_a_torn_tail_never_read(tmp_path):
    """An entry whose length field says 4 GiB - 1 in a small file: a torn tail (the
    crash came before its overwrite), cut without reading or allocating its length."""
    path = tmp_path / "resync.undo"
    path.write_bytes(struct.pack("<4sHQII", b"RUN1", 4, 0, 2**32 - 1, 0) + b"data" + b"x" * 64)
    log = UndoLog(str(path))
    assert _peak_of(log.open) < 256 * KIB
    assert len(log) == 0 and path.stat().st_size == 0
    log.close()


# ---- regressions found by fuzz/fuzz_parsers.py ----------------------------------------

def _bitmap_file(volumes: bytes, nvol: int, granularity: int = 4096) -> bytes:
    body = struct.pack("<4sIQBH", b"RBM1", granularity, 0, 0, nvol) + volumes
    return body + struct.pack("<I", crc32c(body))


@pytest.mark.parametrize("volumes, nvol", [
    # target bitmap: a volume name that is not UTF-8 (0xb4) in a file whose CRC holds
    # raised UnicodeDecodeError out of Bitmap.load
    (struct.pack("<H", 4) + b"\xb4ata" + struct.pack("<Q", 1 << 20) + bytes(32), 1),
    # two volumes announced, the file ends inside the first: struct.error
    (struct.pack("<H", 4) + b"data" + b"\x00\x00", 2),
    # the bits run past the end of the file: the short slice was taken as the bitmap
    (struct.pack("<H", 4) + b"data" + struct.pack("<Q", 1 << 20) + bytes(3), 1),
    # bytes left over after the last volume
    (struct.pack("<H", 4) + b"data" + struct.pack("<Q", 1 << 20) + bytes(32) + b"x", 1),
], ids=["name-not-utf8", "entry-cut-short", "bits-past-the-end", "trailing-bytes"])
def test_fuzz_regression_a_bitmap_whose_checksum_holds_but_lies_is_refused(tmp_path, volumes,
                                                                            nvol):
    path = tmp_path / "t.bm"
    path.write_bytes(_bitmap_file(volumes, nvol))
    with pytest.raises(BitmapError, match="damaged"):
        Bitmap(str(path), {"data": 1 << 20}, 4096).load()


@pytest.mark.parametrize("last", [False, True], ids=["inside", "last-entry"])
def test_fuzz_regression_an_undo_entry_whose_name_is_not_utf8_is_damaged(tmp_path, last):
    """target undo: an entry's CRC covers only its old data, so a volume name of bytes
    c0 61 74 61 with a good CRC raised UnicodeDecodeError out of UndoLog.open."""
    def entry(name: bytes, offset: int) -> bytes:
        old = b"old data"
        return struct.pack("<4sHQII", b"RUN1", len(name), offset, len(old), crc32c(old)) \
            + name + old
    good, bad = entry(b"data", 0), entry(b"\xc0ata", 4096)
    path = tmp_path / "resync.undo"
    path.write_bytes(good + bad if last else bad + good)
    log = UndoLog(str(path))
    with pytest.raises(UndoError, match="damaged entry at offset"):
        log.open()
    log.close()


@pytest.mark.parametrize("base", [
    # target journal_recovery: the first 16 bytes of a segment as the base file raised
    # UnicodeDecodeError out of Journal.open
    b"RJR1\xae<\xd5\xc0\x01\x00\x00\x00\x00\x00\x00\x00",
    b"12\n",  # one field: ValueError (not enough values to unpack)
    b"1 2 3\n", b"x 7\n", b"-1 0\n", b"5 4294967296\n",
], ids=["segment-bytes", "one-field", "three-fields", "not-a-number", "negative-seq",
        "crc-past-u32"])
def test_fuzz_regression_a_damaged_journal_base_is_journal_corruption(tmp_path, base):
    directory = tmp_path / "journal"
    directory.mkdir()
    (directory / "base").write_bytes(base)
    journal = Journal(str(directory), capacity=1 << 20, segment_size=1 << 20)
    with pytest.raises(JournalCorruptError, match="base is not"):
        journal.open()
    journal.close()
