"""The sans-IO replication protocol: sessions between two in-memory connections,
parsers fed whole, byte by byte and with trailing bytes, and every malformed input."""

import json
import random
import re
import struct

import pytest
import zstandard
from crc32c import crc32c

from replicator.wire import (ANY_SEQ, DEFAULT_MAX_FRAME, HASH_SIZE, HEADER_SIZE, LEGACY_MAGIC,
                             MAGIC, NEED_DATA, PROTOCOL_MAX, PROTOCOL_MIN, Ack, Flush,
                             Connection, Diverged, Fetch, Handover,
                             ConnectionClosed, Error, Feature, FrameType, HashReply,
                             HashRequest, Heartbeat, Hello,
                             LocalProtocolError, Mismatch, Offload, Processed, Records,
                             Refusal, Refuse, RemoteProtocolError, Report,
                             ResyncAck, ResyncBegin, ResyncData, ResyncDone, Retain, Role, State,
                             Successor, Welcome, code_name, negotiate)
from replicator.wire.frames import MAX_HASH_REGIONS, decode_body, encode_body

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a test extra; without it the parametrised cases still run
    given = None

V = PROTOCOL_MAX
HELLO = Hello(proto_min=V, proto_max=V, features=Feature.ZSTD, node="dc1", group="db", target="dc2")
WELCOME = Welcome(version=V, features=Feature.ZSTD, seq=41, crc=0xDEADBEEF, node="dc2")


# ---- helpers ------------------------------------------------------------------------------

def header(ftype, length, flags=0, crc=0, magic=MAGIC, hcrc=None):
    """A frame header built by hand (the header CRC right unless hcrc is given)."""
    head = struct.pack("<HBBII", magic, ftype, flags, length, crc)
    return head + struct.pack("<I", crc32c(head) if hcrc is None else hcrc)


def frame(ftype, body, flags=0, crc=None, magic=MAGIC, length=None, hcrc=None):
    """A frame built by hand, so tests can break any part of it."""
    return header(ftype, len(body) if length is None else length, flags,
                  crc32c(body) if crc is None else crc, magic, hcrc) + body


def text(value: bytes) -> bytes:
    return struct.pack("<H", len(value)) + value


NO_HISTORY = struct.pack("<H", 0)


def hello_body(pmin=V, pmax=V, features=1, node=b"dc1", group=b"db", target=b"dc2"):
    return (struct.pack("<HHIQ", pmin, pmax, features, 0) + text(node) + text(group) + text(target)
            + NO_HISTORY)


def records_body(first=1, last=1, raw_length=None, payload=b"x"):
    if raw_length is None:
        raw_length = len(payload)
    return struct.pack("<QQI", first, last, raw_length) + payload


def drain(conn):
    """Every event available now (stopping after NEED_DATA or ConnectionClosed)."""
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def handshake(hello=HELLO, welcome=WELCOME, **kw):
    s, r = Connection(Role.SENDER, **kw), Connection(Role.RECEIVER, **kw)
    r.receive_data(s.send(hello))
    assert drain(r) == [hello]
    s.receive_data(r.send(welcome))
    assert drain(s) == [welcome]
    return s, r


def hello_received(**kw):
    r = Connection(Role.RECEIVER, **kw)
    r.receive_data(frame(FrameType.HELLO, hello_body()))
    drain(r)
    return r


def streaming_receiver(**kw):
    r = hello_received(**kw)
    r.send(WELCOME)
    return r


def streaming_sender(**kw):
    s = Connection(Role.SENDER, **kw)
    s.send(HELLO)
    s.receive_data(frame(FrameType.WELCOME, struct.pack("<HIQI", V, 1, 41, 0) + text(b"dc2")
                         + NO_HISTORY))
    drain(s)
    return s



def test_records_are_compressed_at_the_sending_side_zstd_level():
    """compress_level reaches the compressor: a higher level packs the same records
    smaller, and the receiver (which knows no level) reads them back alike."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(3, 9))) for _ in range(400)]
    payload = b" ".join(rng.choices(words, k=40_000))
    sizes = {}
    for level in (1, 19):
        s, r = streaming_sender(zstd_level=level), Connection(Role.RECEIVER)
        r.receive_data(Connection(Role.SENDER).send(HELLO))
        drain(r)
        r.send(WELCOME)
        packed = Records(first_seq=42, last_seq=42, payload=payload, compress=True)
        wire = s.send(packed)
        sizes[level] = len(wire)
        r.receive_data(wire)
        assert drain(r) == [packed]
    assert sizes[19] < sizes[1] * 0.9, sizes

def assert_failed(conn, error):
    assert conn.state == State.ERROR
    with pytest.raises(error):
        conn.next_event()
    with pytest.raises(error):
        conn.receive_data(b"more")
    with pytest.raises(error):
        conn.send(Heartbeat(sent_ns=1))


# ---- sessions -----------------------------------------------------------------------------

def test_full_session_both_ways():
    s, r = Connection(Role.SENDER), Connection(Role.RECEIVER)
    assert (s.our_role, s.state, r.state) == (Role.SENDER, State.START, State.START)
    r.receive_data(s.send(HELLO))
    assert s.state == State.HELLO_SENT
    assert drain(r) == [HELLO] and r.state == State.HELLO_RECEIVED
    s.receive_data(r.send(WELCOME))
    assert r.state == State.STREAMING
    assert drain(s) == [WELCOME] and s.state == State.STREAMING
    assert (s.version, s.features, r.version, r.features) == (V, Feature.ZSTD, V, Feature.ZSTD)

    plain = Records(first_seq=42, last_seq=42, payload=b"abc")
    packed = Records(first_seq=43, last_seq=50, payload=b"x" * 100_000, compress=True)
    wire = s.send(plain) + s.send(packed) + s.send(Heartbeat(sent_ns=5))
    assert len(wire) < 10_000  # the 100 kB payload went compressed
    r.receive_data(wire)
    assert drain(r) == [plain, packed, Heartbeat(sent_ns=5)]

    s.receive_data(r.send(Ack(seq=42, durable=42)) + r.send(Ack(seq=50, durable=50)) + r.send(Heartbeat(sent_ns=9)))
    assert drain(s) == [Ack(seq=42, durable=42), Ack(seq=50, durable=50), Heartbeat(sent_ns=9)]

    r.receive_data(s.send(Error(code=Refusal.INTERNAL, message="shutting down")))
    assert s.state == State.CLOSED
    assert drain(r) == [Error(code=Refusal.INTERNAL, message="shutting down")]
    assert r.state == State.CLOSED
    r.receive_data(b"")
    s.receive_data(b"")
    assert drain(r) == [ConnectionClosed()] and drain(s) == [ConnectionClosed()]
    assert r.next_event() == ConnectionClosed()  # and it stays closed


def test_refusal_path():
    s, r = Connection(Role.SENDER), Connection(Role.RECEIVER)
    r.receive_data(s.send(HELLO))
    drain(r)
    wire = r.send(Refuse(code=Refusal.WRONG_SOURCE, reason="only dc9 ships group db"))
    assert r.state == State.CLOSED
    with pytest.raises(LocalProtocolError, match="cannot send ACK in state closed"):
        r.send(Ack(seq=1, durable=1))
    s.receive_data(wire + b"")
    s.receive_data(b"")
    refuse, closed = drain(s)
    assert refuse == Refuse(code=Refusal.WRONG_SOURCE, reason="only dc9 ships group db")
    assert closed == ConnectionClosed() and s.state == State.CLOSED
    assert s.version is None and s.features is None


def test_unknown_codes_arrive_as_ints():
    s = Connection(Role.SENDER)
    s.send(HELLO)
    s.receive_data(frame(FrameType.REFUSE, struct.pack("<H", 4242) + text(b"future reason")))
    (ev,) = drain(s)
    assert ev.code == 4242 and not isinstance(ev.code, Refusal)


def test_error_in_every_open_state_closes():
    for make in (lambda: Connection(Role.SENDER), lambda: Connection(Role.RECEIVER),
                 hello_received, streaming_receiver, streaming_sender):
        conn = make()
        conn.send(Error(code=Refusal.BUSY, message="later"))
        assert conn.state == State.CLOSED
        conn = make()
        conn.receive_data(frame(FrameType.ERROR, struct.pack("<H", 6) + text(b"later")))
        assert drain(conn) == [Error(code=Refusal.BUSY, message="later")]
        assert conn.state == State.CLOSED


def test_sender_may_receive_error_while_waiting_for_welcome():
    s = Connection(Role.SENDER)
    s.send(HELLO)
    s.receive_data(frame(FrameType.ERROR, struct.pack("<H", 99) + text(b"disk on fire")))
    assert drain(s) == [Error(code=Refusal.INTERNAL, message="disk on fire")]


# ---- feeding the parsers --------------------------------------------------------------

def sender_stream():
    """What a sender writes after HELLO, and the events the receiver must see."""
    s, _ = handshake()
    events = [Records(first_seq=42, last_seq=44, payload=b"r" * 5000),
              Records(first_seq=45, last_seq=45, payload=b"z" * 70000, compress=True),
              Heartbeat(sent_ns=123),
              Records(first_seq=46, last_seq=46, payload=b""),
              Records(first_seq=47, last_seq=47, payload=b"", compress=True),
              Error(code=Refusal.POSITION, message="bye")]
    return b"".join(s.send(ev) for ev in events), events


def receiver_stream():
    _, r = handshake()
    events = [Ack(seq=40, durable=40), Heartbeat(sent_ns=1), Ack(seq=41, durable=41),
              Error(code=Refusal.INTERNAL, message="é" * 20)]
    return b"".join(r.send(ev) for ev in events), events


def expected(ev):
    # An empty payload cannot shrink, so it goes uncompressed whatever was asked.
    if isinstance(ev, Records) and not ev.payload:
        return Records(first_seq=ev.first_seq, last_seq=ev.last_seq, payload=b"")
    return ev


@pytest.mark.parametrize("stream,parser", [(sender_stream, streaming_receiver),
                                           (receiver_stream, streaming_sender)])
@pytest.mark.parametrize("feed", ["whole", "bytewise", "trailing"])
def test_parser_feeding(stream, parser, feed):
    data, events = stream()
    conn = parser()
    got = []
    if feed == "whole":
        conn.receive_data(data)
        got = drain(conn)
    elif feed == "bytewise":
        for i in range(len(data)):
            conn.receive_data(data[i:i + 1])
            got += drain(conn)
    else:
        # Every event but the last whole, with the last one partially present at
        # every possible cut: the partial frame waits in the buffer, then completes.
        last = len(data) - len(frame(FrameType.ERROR, struct.pack("<H", int(events[-1].code))
                                     + text(events[-1].message.encode())))
        conn.receive_data(data[:last])
        got = drain(conn)
        for cut in range(last, len(data)):
            probe = parser()
            probe.receive_data(data[:last] + data[last:cut + 1])
            head = drain(probe)
            if cut + 1 < len(data):
                assert len(head) == len(events) - 1
                assert bytes(probe._buf) == data[last:cut + 1]  # untouched
                assert probe.next_event() is NEED_DATA
        conn.receive_data(data[last:last + 5])  # partial header
        assert conn.next_event() is NEED_DATA
        assert bytes(conn._buf) == data[last:last + 5]
        conn.receive_data(data[last + 5:])
        got += drain(conn)
    assert got == [expected(ev) for ev in events]
    assert [getattr(ev, "compress", None) for ev in got] == \
        [getattr(expected(ev), "compress", None) for ev in events]


def test_frames_before_eof_are_delivered_first():
    data, events = receiver_stream()
    s = streaming_sender()
    s.receive_data(data)
    s.receive_data(b"")
    assert drain(s) == events + [ConnectionClosed()]


ROUND_TRIP = [
    Hello(proto_min=1, proto_max=7, features=0, node="", group="g", target="t"),
    Hello(proto_min=0, proto_max=65535, features=2**32 - 1, node="n" * 255,
          group="ü" * 127, target="日本"),
    Welcome(version=1, features=1, seq=2**64 - 1, crc=2**32 - 1, node="ñ" * 127),
    Refuse(code=Refusal.VERSION, reason="r" * 1024),
    Records(first_seq=1, last_seq=2**64 - 1, payload=bytes(range(256)) * 10),
    Records(first_seq=9, last_seq=9, payload=b"a" * 4096, compress=True),
    Ack(seq=0, durable=0), Heartbeat(sent_ns=2**64 - 1), Error(code=65535, message="m" * 1024),
    ResyncData(volume="data", offset=2**64 - 1, payload=b"x" * 65536),
    ResyncData(volume="v" * 255, offset=0, payload=b""),
    ResyncDone(seq=2**64 - 1, crc=2**32 - 1), ResyncAck(count=2**64 - 1),
    HashRequest(id=2**64 - 1, seq=ANY_SEQ, volume="data", offset=0, length=1 << 20,
                granularity=65536),
    HashRequest(id=0, seq=7, volume="v", offset=2**63, length=1, granularity=4096),
    HashReply(id=5, seq=9, hashes=bytes(range(16))), HashReply(id=0, seq=0, hashes=b""),
    HashReply(id=1, seq=2, hashes=bytes(range(256)) * 256),  # 4096 hashes: MAX_HASH_REGIONS
    Hello(proto_min=1, proto_max=1, features=0, node="a", group="g", target="b", seq=2**64 - 1,
          history=((2**64 - 1, 1), (7, 2**64 - 1))),
    Welcome(version=1, features=0, seq=3, crc=4, node="b", history=((1, 1),) * 1024),
    Diverged(fork=100, complete=True, extents=(("data", 0, 65536), ("log", 2**63, 1))),
    Diverged(fork=0, complete=False),
    Handover(seq=9, targets=(("dc1", "sync", "none", "continue", None),
                             ("dc3", "async", "zstd", "block", None),
                             ("dc4", "periodic", "none", "continue", 30.0))),
    Handover(seq=0),
    Retain(seq=0), Retain(seq=2**64 - 1),
    ResyncBegin(seq=0), ResyncBegin(seq=2**64 - 1),
    Successor(seq=7, node="dc2"), Successor(seq=2**64 - 1, node="n" * 255),
]


def round_trip(event):
    """Encode a frame body and decode it again: the codec over every value a field can
    hold (the connection's states and ranges, which refuse some of them, are tested
    with sessions below)."""
    flags, parts = encode_body(event, max_frame=DEFAULT_MAX_FRAME,
                               compressor=zstandard.ZstdCompressor())
    return decode_body(type(event).frame_type, flags, memoryview(b"".join(parts)),
                       max_frame=DEFAULT_MAX_FRAME, decompressor=zstandard.ZstdDecompressor())


@pytest.mark.parametrize("event", ROUND_TRIP, ids=lambda ev: type(ev).__name__)
def test_round_trip(event):
    assert round_trip(event) == event


if given is not None:
    names = st.text(max_size=60)

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(
        st.builds(Hello, proto_min=st.integers(0, 100), proto_max=st.integers(100, 65535),
                  features=st.integers(0, 2**32 - 1), node=names, group=names, target=names),
        st.builds(Ack, seq=st.integers(0, 2**64 - 1), durable=st.integers(0, 2**64 - 1)),
        st.builds(Flush, seq=st.integers(0, 2**64 - 1)),
        st.builds(Heartbeat, sent_ns=st.integers(0, 2**64 - 1)),
        st.builds(Error, code=st.integers(0, 65535), message=names),
        st.builds(lambda first, n, payload, compress: Records(
            first_seq=first, last_seq=first + n, payload=payload, compress=compress),
            st.integers(1, 2**63), st.integers(0, 2**32), st.binary(max_size=5000),
            st.booleans())))
    def test_round_trip_property(event):
        got = round_trip(event)
        if isinstance(event, Records):
            assert (got.first_seq, got.last_seq, got.payload) == \
                (event.first_seq, event.last_seq, event.payload)
        else:
            assert got == event


if given is not None:
    u8, u16, u32, u64 = (st.integers(0, 2**bits - 1) for bits in (8, 16, 32, 64))
    histories = st.lists(st.tuples(u64, u64), max_size=8).map(tuple)
    ANY_FRAME = {
        FrameType.HELLO: st.builds(Hello, proto_min=st.integers(0, 100),
                                   proto_max=st.integers(100, 65535), features=u32, node=names,
                                   group=names, target=names, seq=u64, history=histories),
        FrameType.WELCOME: st.builds(Welcome, version=u16, features=u32, seq=u64, crc=u32,
                                     node=names, history=histories),
        FrameType.REFUSE: st.builds(Refuse, code=u16, reason=names),
        FrameType.RECORDS: st.builds(lambda first, n, payload, compress: Records(
            first_seq=first, last_seq=first + n, payload=payload, compress=compress),
            st.integers(1, 2**63), st.integers(0, 2**32), st.binary(max_size=2000),
            st.booleans()),
        FrameType.ACK: st.builds(Ack, seq=u64, durable=u64),
        FrameType.HEARTBEAT: st.builds(Heartbeat, sent_ns=u64),
        FrameType.ERROR: st.builds(Error, code=u16, message=names),
        FrameType.RESYNC_DATA: st.builds(ResyncData, volume=names, offset=u64,
                                         payload=st.binary(max_size=2000)),
        FrameType.RESYNC_DONE: st.builds(ResyncDone, seq=u64, crc=u32),
        FrameType.RESYNC_ACK: st.builds(ResyncAck, count=u64),
        FrameType.HASH_REQUEST: st.builds(
            lambda granularity, regions, **kw: HashRequest(
                granularity=granularity, length=granularity * regions, **kw),
            st.integers(1, 2**20), st.integers(1, MAX_HASH_REGIONS), id=u64, seq=u64,
            volume=names, offset=u64),
        FrameType.HASH_REPLY: st.builds(HashReply, id=u64, seq=u64, hashes=st.binary(
            max_size=64).map(lambda b: b[:len(b) - len(b) % HASH_SIZE])),
        FrameType.DIVERGED: st.builds(Diverged, fork=u64, complete=st.booleans(),
                                      extents=st.lists(st.tuples(names, u64, u64),
                                                       max_size=4).map(tuple)),
        FrameType.HANDOVER: st.builds(Handover, seq=u64, targets=st.lists(st.one_of(
            st.tuples(names, names.filter(
                lambda m: m != "periodic"), st.sampled_from(["none", "zstd"]),
                st.sampled_from(["continue", "block"]), st.none()),
            st.tuples(names, st.just("periodic"), st.sampled_from(["none", "zstd"]),
                      st.sampled_from(["continue", "block"]),
                      st.integers(100, 2**32 - 1).map(lambda ms: ms / 1000))),
            max_size=4).map(tuple)),
        FrameType.FETCH: st.builds(Fetch, seq=u64, crc=u32),
        FrameType.RETAIN: st.builds(Retain, seq=u64),
        FrameType.RESYNC_BEGIN: st.builds(ResyncBegin, seq=u64),
        FrameType.SUCCESSOR: st.builds(Successor, seq=u64, node=names),
        FrameType.FLUSH: st.builds(Flush, seq=u64),
        FrameType.OFFLOAD: st.builds(Offload, target=names, ops=u8, reason=names),
        FrameType.PROCESSED: st.builds(lambda first, n, target, payload: Processed(
            target=target, first_seq=first, last_seq=first + n, payload=payload),
            st.integers(1, 2**63), st.integers(0, 2**32), names, st.binary(max_size=2000)),
        FrameType.MISMATCH: st.builds(Mismatch, seq=u64, volume=names, offset=u64,
                                      length=u64),
        FrameType.REPORT: st.builds(Report, report=st.dictionaries(
            names, st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53)
                                | st.text(max_size=20),
                                lambda inner: st.lists(inner, max_size=4)
                                | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                                max_leaves=20), max_size=6)),
    }

    def test_the_round_trip_property_covers_every_frame_type():
        assert set(ANY_FRAME) == set(FrameType)

    @settings(max_examples=400, deadline=None)
    @given(st.one_of(*ANY_FRAME.values()))
    def test_round_trip_of_every_frame_type_property(event):
        got = round_trip(event)
        if isinstance(event, Records):  # compress says how it arrived, not what was asked
            assert (got.first_seq, got.last_seq, got.payload) == \
                (event.first_seq, event.last_seq, event.payload)
        else:
            assert got == event


def test_free_text_is_cut_at_a_character_boundary():
    s, r = handshake()
    r.receive_data(s.send(Error(code=Refusal.INTERNAL, message="é" * 600)))
    (ev,) = drain(r)
    assert ev.message == "é" * 512  # 1024 bytes: operators see the whole diagnostic
    s = Connection(Role.SENDER)
    s.send(HELLO)
    r = hello_received()
    s.receive_data(r.send(Refuse(code=Refusal.BUSY, reason="x" * 5000)))
    assert drain(s)[0].reason == "x" * 1024


def test_incompressible_records_go_uncompressed():
    s, r = handshake()
    noise = bytes(range(256))  # too short for zstd to win
    r.receive_data(s.send(Records(first_seq=42, last_seq=42, payload=noise, compress=True)))
    (ev,) = drain(r)
    assert ev.payload == noise and not ev.compress


def test_records_validation_and_repr():
    for first, last in ((0, 0), (0, 5), (3, 2)):
        with pytest.raises(ValueError):
            Records(first_seq=first, last_seq=last, payload=b"")
    with pytest.raises(TypeError):
        Records(1, 1, b"")  # keyword-only
    assert "payload=<1000000 bytes>" in repr(Records(first_seq=1, last_seq=1, payload=bytes(10**6)))


def test_ignorable_frames_are_skipped():
    r = streaming_receiver()
    r.receive_data(frame(0x80, b"future stuff") + frame(0xFF, b"", flags=0xFF)
                   + frame(0xC3, b"x" * 100) + frame(6, struct.pack("<Q", 7)))
    assert drain(r) == [Heartbeat(sent_ns=7)] and r.state == State.STREAMING
    fresh = Connection(Role.RECEIVER)  # before HELLO too: they are not in the state machine
    fresh.receive_data(frame(0x90, b"?") + frame(FrameType.HELLO, hello_body()))
    assert drain(fresh)[0].node == "dc1"


def test_ignorable_frames_still_need_a_good_checksum():
    r = streaming_receiver()
    r.receive_data(frame(0x80, b"future stuff", crc=0))
    with pytest.raises(RemoteProtocolError, match="crc mismatch"):
        r.next_event()


# ---- the frame header's own checksum ------------------------------------------------------

def ack_stream():
    """What a sender reads while streaming: an ACK between heartbeats (issue 13 item 8:
    a flipped length bit in such an ACK stalled every sync write)."""
    _, r = handshake()
    return r.send(Ack(seq=7, durable=7)), r.send(Heartbeat(sent_ns=1)) * 50


@pytest.mark.parametrize("bit", range(HEADER_SIZE * 8))
def test_any_flipped_header_bit_is_refused_at_once(bit):
    """Every single-bit error in a header is refused as soon as the header is in:
    never NEED_DATA for a body that a damaged length invented, whatever follows."""
    ack, heartbeats = ack_stream()
    damaged = bytearray(ack)
    damaged[bit // 8] ^= 1 << (bit % 8)
    s = streaming_sender()
    s.receive_data(bytes(damaged[:HEADER_SIZE]))  # the header alone
    with pytest.raises(RemoteProtocolError, match="magic|header crc|unknown flags|type"):
        s.next_event()
    assert_failed(s, RemoteProtocolError)
    s = streaming_sender()
    s.receive_data(bytes(damaged) + heartbeats)  # with heartbeats after it
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_a_length_flip_is_named_and_not_waited_for():
    ack, heartbeats = ack_stream()
    for flipped in (ack[:5] + bytes([ack[5] ^ 0x40]) + ack[6:],  # +16 KiB
                    ack[:6] + bytes([ack[6] ^ 0x01]) + ack[7:]):  # +64 KiB
        s = streaming_sender()
        s.receive_data(flipped + heartbeats)
        with pytest.raises(RemoteProtocolError, match="frame header crc mismatch.*type 0x05"):
            s.next_event()


def test_missing_bytes_of_the_frame_in_progress():
    s, r = handshake()
    wire = s.send(Records(first_seq=1, last_seq=1, payload=b"r" * 1000))
    assert r.missing_bytes == 0
    r.receive_data(wire[:HEADER_SIZE - 1])
    assert r.next_event() is NEED_DATA and r.missing_bytes == 0  # no whole header yet
    r.receive_data(wire[HEADER_SIZE - 1:100])
    assert r.next_event() is NEED_DATA and r.missing_bytes == len(wire) - 100
    r.receive_data(wire[100:])
    assert r.next_event().payload == b"r" * 1000 and r.missing_bytes == 0


if given is not None:
    # what an honest end may send after WELCOME(seq=41): an ACK of a seq the stream named,
    # the RECORDS that follow it without a gap
    EVENTS = st.one_of(st.builds(lambda q: Ack(seq=q, durable=q), st.integers(0, 41)),
                       st.builds(Heartbeat, sent_ns=st.integers(0, 2**64 - 1)),
                       st.builds(lambda payload: Records(first_seq=42, last_seq=42,
                                                         payload=payload),
                                 st.binary(max_size=300)))

    @settings(max_examples=300, deadline=None)
    @given(EVENTS, st.lists(st.tuples(st.integers(0, HEADER_SIZE - 1), st.integers(1, 255)),
                            min_size=1, max_size=4))
    def test_damaged_headers_never_wait_for_a_body_property(event, damage):
        """Up to four damaged header bytes (CRC32C catches every burst of up to 32 bits
        and any odd number of flipped bits) are refused from the header alone."""
        s, r = handshake()
        wire = bytearray(r.send(event) if isinstance(event, (Ack, Heartbeat)) else s.send(event))
        original = bytes(wire[:HEADER_SIZE])
        for pos, xor in damage:
            wire[pos] ^= xor
        if bytes(wire[:HEADER_SIZE]) == original:
            return  # the flips cancelled out
        burst = max(p for p, _ in damage) - min(p for p, _ in damage) < 4
        conn = streaming_sender() if isinstance(event, (Ack, Heartbeat)) else streaming_receiver()
        conn.receive_data(bytes(wire[:HEADER_SIZE]))
        try:
            ev = conn.next_event()
        except RemoteProtocolError:
            return
        # Not refused: only possible for damage CRC32C does not always catch, and then
        # the header is taken as it says (never a wait on a body of a length not checked).
        assert not burst, f"a burst of damage in {damage} went undetected: {ev!r}"

    @settings(max_examples=500, deadline=None)
    @given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE), st.binary(max_size=64))
    def test_random_headers_only_raise_remote_errors_property(head, rest):
        """Arbitrary header bytes: a RemoteProtocolError from the header alone (the odds
        of a random header with a valid CRC are 2**-32)."""
        r = streaming_receiver()
        r.receive_data(head + rest)
        with pytest.raises(RemoteProtocolError):
            r.next_event()


# ---- malformed input ----------------------------------------------------------------------

GOOD_HELLO = frame(FrameType.HELLO, hello_body())

MALFORMED_AT_START = [
    ("magic", frame(1, hello_body(), magic=0x5052), "bad frame magic 0x5052"),
    ("protocol 1 peer", struct.pack("<HBBII", LEGACY_MAGIC, 1, 0, 5, 0) + b"hello",
     "speaks replication protocol 1 .* upgrade the peer"),
    ("crc", frame(1, hello_body(), crc=0x12345678), "body crc mismatch"),
    ("header crc", frame(1, hello_body(), hcrc=0x12345678), "header crc mismatch"),
    ("header bit flip", GOOD_HELLO[:3] + b"\x01" + GOOD_HELLO[4:], "header crc mismatch"),
    ("body bit flip", GOOD_HELLO[:-1] + b"3", "body crc mismatch"),
    ("compressed hello", frame(1, hello_body(), flags=1), "flags 0x01"),
    ("unknown flag", frame(1, hello_body(), flags=0x04), "unknown flags 0x04"),
    ("type 0", frame(0, b""), "unknown frame type 0x00"),
    ("type 0x42", frame(0x42, b""), "unknown frame type 0x42"),
    ("type 0x7f", frame(0x7F, b"abc"), "unknown frame type 0x7f"),
    ("trailing", frame(1, hello_body() + b"X"), "1 trailing bytes"),
    ("short fixed", frame(1, hello_body()[:7]),
     "too short for proto_min, proto_max, features, seq"),
    ("short string length", frame(1, hello_body()[:16 + 5 + 4] + b"\x03"),
     "too short for target length"),
    ("string past body", frame(1, hello_body()[:-3]), "field target length 3 runs past"),
    ("name too long", frame(1, hello_body(node=b"n" * 256)), "field node length 256 exceeds 255"),
    ("bad utf-8", frame(1, hello_body(group=b"\xff\xfe")), "field group is not valid UTF-8"),
    ("overlong utf-8", frame(1, hello_body(node=b"\xc0\xaf")), "field node is not valid UTF-8"),
    ("surrogate", frame(1, hello_body(target=b"\xed\xa0\x80")), "field target is not valid UTF-8"),
    ("versions reversed", frame(1, hello_body(pmin=2, pmax=1)), "proto_min 2 > proto_max 1"),
    ("records first", frame(4, records_body()), "cannot receive RECORDS in state start"),
    ("ack first", frame(5, struct.pack("<QQ", 1, 1)), "cannot receive ACK in state start"),
    ("welcome to receiver", frame(2, struct.pack("<HIQI", 1, 0, 0, 0) + text(b"x") + NO_HISTORY),
     "cannot receive WELCOME"),
    ("error too short", frame(7, b"\x01"), "ERROR body of 1 bytes is too short for code"),
    ("error message too long", frame(7, struct.pack("<H", 1) + text(b"m" * 1025)),
     "field message length 1025 exceeds 1024"),
    ("history too long", frame(1, hello_body()[:-2] + struct.pack("<H", 1025)),
     "history of 1025 generations exceeds 1024"),
    ("history cut", frame(1, hello_body()[:-2] + struct.pack("<HQ", 1, 5)),
     "too short for generation id, first_seq"),
    ("heartbeat trailing", frame(6, struct.pack("<Q", 1) + b"\0"), "HEARTBEAT body has 1 trailing"),
    ("retain short", frame(16, b"\0" * 7), "RETAIN"),
]


@pytest.mark.parametrize("wire,match", [c[1:] for c in MALFORMED_AT_START],
                         ids=[c[0] for c in MALFORMED_AT_START])
@pytest.mark.parametrize("feed", ["whole", "bytewise"])
def test_malformed_input_is_a_remote_error(wire, match, feed):
    r = Connection(Role.RECEIVER)
    with pytest.raises(RemoteProtocolError, match=match):
        if feed == "whole":
            r.receive_data(wire)
            r.next_event()
        else:
            for i in range(len(wire)):
                r.receive_data(wire[i:i + 1])
                assert r.next_event() is NEED_DATA
    assert_failed(r, RemoteProtocolError)


def fuzz_one(type_code, flags, body):
    """A checksum-valid frame with an arbitrary body gives an event or a
    RemoteProtocolError, never any other exception."""
    conn = {FrameType.HELLO: lambda: Connection(Role.RECEIVER),
            FrameType.WELCOME: hello_sent, FrameType.REFUSE: hello_sent,
            FrameType.ACK: streaming_sender, FrameType.RESYNC_ACK: streaming_sender,
            FrameType.HASH_REPLY: streaming_sender, FrameType.DIVERGED: streaming_sender}.get(type_code, streaming_receiver)()
    conn.receive_data(frame(type_code, body, flags=flags))
    try:
        conn.next_event()
    except RemoteProtocolError:
        assert conn.state == State.ERROR


def hello_sent():
    s = Connection(Role.SENDER)
    s.send(Hello(proto_min=0, proto_max=65535, features=2**32 - 1, node="a", group="b", target="c"))
    return s


@pytest.mark.parametrize("type_code", list(FrameType))
def test_random_bodies_only_raise_remote_errors(type_code):
    rng = random.Random(type_code)
    seeds = [b"", hello_body(), records_body(payload=zstd.compress(b"abc" * 50)),
             struct.pack("<HIQI", 1, 1, 5, 5) + text(b"dc2") + NO_HISTORY]
    for _ in range(400):
        if rng.random() < 0.7:
            body = bytearray(rng.choice(seeds))
        else:
            body = bytearray(rng.randbytes(rng.randrange(40)))
        for _ in range(rng.randrange(4)):
            if body:
                body[rng.randrange(len(body))] = rng.randrange(256)
        if rng.random() < 0.3:
            body = body[:rng.randrange(len(body) + 1)]
        fuzz_one(type_code, rng.choice((0, 0, 1)), bytes(body))


if given is not None:
    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from(list(FrameType)), st.integers(0, 3), st.binary(max_size=80))
    def test_random_bodies_property(type_code, flags, body):
        fuzz_one(type_code, flags, body)

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=200))
    def test_hash_reply_bodies_property(id_, seq, hashes):
        """A HASH_REPLY of whole 16-byte hashes decodes to exactly them; any other length
        (such as a protocol 2 peer's 8-byte hashes) is the peer's protocol error."""
        body = struct.pack("<QQ", id_, seq) + hashes
        if len(hashes) % HASH_SIZE:
            conn = streaming_sender()
            conn.receive_data(frame(FrameType.HASH_REPLY, body))
            with pytest.raises(RemoteProtocolError, match="is not whole hashes"):
                conn.next_event()
            assert_failed(conn, RemoteProtocolError)
        else:  # (the codec alone: a connection also wants a HASH_REQUEST of that id)
            got = decode_body(FrameType.HASH_REPLY, 0, memoryview(body),
                              max_frame=DEFAULT_MAX_FRAME, decompressor=None)
            assert got == HashReply(id=id_, seq=seq, hashes=hashes)


def test_oversized_body_is_refused_from_its_header():
    r = Connection(Role.RECEIVER, max_frame=1000)
    r.receive_data(header(1, 1001))  # no body yet
    with pytest.raises(RemoteProtocolError, match="length 1001 exceeds max_frame 1000"):
        r.next_event()
    assert_failed(r, RemoteProtocolError)


def test_records_of_exactly_max_frame_pass():
    s, r = handshake(max_frame=1020)
    r.receive_data(s.send(Records(first_seq=42, last_seq=42, payload=b"p" * 1000)))
    assert drain(r)[0].payload == b"p" * 1000
    with pytest.raises(LocalProtocolError, match="exceeds max_frame 1020"):
        s.send(Records(first_seq=43, last_seq=43, payload=b"p" * 1001))


zstd = zstandard.ZstdCompressor()
unsized = zstandard.ZstdCompressor(write_content_size=False)


def unsized_frame(data):
    cobj = unsized.compressobj()
    return cobj.compress(data) + cobj.flush()


BAD_RECORDS = [
    ("first_seq 0", records_body(first=0, last=0), 0, "first_seq 0 must be >= 1"),
    ("seq reversed", records_body(first=5, last=4), 0, "last_seq 4 < first_seq 5"),
    ("short", struct.pack("<QQ", 1, 1), 0, "too short for first_seq, last_seq, raw_length"),
    ("raw_length > payload", records_body(raw_length=10, payload=b"abc"), 0,
     "payload is 3 bytes but raw_length is 10"),
    ("raw_length < payload", records_body(raw_length=1, payload=b"abc"), 0,
     "payload is 3 bytes but raw_length is 1"),
    ("not zstd", records_body(raw_length=10, payload=b"not zstd at all"), 1, "zstd frame header"),
    ("declared size lies", records_body(raw_length=10, payload=zstd.compress(b"a" * 5000)), 1,
     "declares 5000 bytes but raw_length is 10"),
    ("unsized, inflates past raw_length", records_body(raw_length=10,
                                                       payload=unsized_frame(b"a" * 5000)), 1,
     "does not inflate to raw_length 10"),
    ("unsized, inflates short", records_body(raw_length=6000, payload=unsized_frame(b"a" * 5000)),
     1, "inflates to 5000 bytes but raw_length is 6000"),
    ("two zstd frames", records_body(raw_length=3, payload=zstd.compress(b"abc") * 2), 1,
     "unused data"),
    ("junk after zstd frame", records_body(raw_length=3, payload=zstd.compress(b"abc") + b"!"),
     1, "unused data"),
    ("junk after empty zstd frame", records_body(raw_length=0, payload=zstd.compress(b"") + b"!"),
     1, "not exactly one zstd frame"),
    ("truncated zstd frame", records_body(raw_length=5120,
                                          payload=zstd.compress(bytes(range(256)) * 20)[:-4]), 1,
     "does not inflate"),
    ("raw_length > max_frame", records_body(raw_length=2**30, payload=b""), 1,
     "raw_length 1073741824 exceeds max_frame"),
]


@pytest.mark.parametrize("body,flags,match", [c[1:] for c in BAD_RECORDS],
                         ids=[c[0] for c in BAD_RECORDS])
def test_bad_records(body, flags, match):
    r = streaming_receiver()
    r.receive_data(frame(FrameType.RECORDS, body, flags=flags))
    with pytest.raises(RemoteProtocolError, match=match):
        r.next_event()
    assert_failed(r, RemoteProtocolError)


BAD_HASH_FRAMES = [
    ("request, zero length", FrameType.HASH_REQUEST,
     struct.pack("<QQQQI", 1, 1, 0, 0, 4096) + text(b"v"), "length 0 and granularity 4096"),
    ("request, zero granularity", FrameType.HASH_REQUEST,
     struct.pack("<QQQQI", 1, 1, 0, 4096, 0) + text(b"v"), "granularity 0 must be positive"),
    ("request, too many regions", FrameType.HASH_REQUEST,
     struct.pack("<QQQQI", 1, 1, 0, 4097 * 4096, 4096) + text(b"v"), "4097 regions exceeds"),
    ("request, no volume", FrameType.HASH_REQUEST, struct.pack("<QQQQI", 1, 1, 0, 1, 1),
     "too short for volume length"),
    ("diverged, complete 2", FrameType.DIVERGED, struct.pack("<QB", 1, 2),
     "complete must be 0 or 1"),
    ("diverged, cut extent", FrameType.DIVERGED, struct.pack("<QB", 1, 1) + text(b"v") + b"\0" * 9,
     "too short for offset, length"),
    ("reply, partial hash", FrameType.HASH_REPLY, struct.pack("<QQ", 1, 1) + b"\0" * 12,
     "12 bytes is not whole hashes"),
    ("reply, protocol 2 hashes", FrameType.HASH_REPLY, struct.pack("<QQ", 1, 1) + b"\0" * 24,
     "24 bytes is not whole hashes"),
]


@pytest.mark.parametrize("kind,body,match", [c[1:] for c in BAD_HASH_FRAMES],
                         ids=[c[0] for c in BAD_HASH_FRAMES])
def test_bad_hash_frames(kind, body, match):
    conn = (streaming_sender() if kind in (FrameType.HASH_REPLY, FrameType.DIVERGED)
            else streaming_receiver())
    conn.receive_data(frame(kind, body))
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()
    assert_failed(conn, RemoteProtocolError)


def test_hash_reply_is_whole_16_byte_hashes():
    assert HASH_SIZE == 16
    r = streaming_receiver()
    with pytest.raises(LocalProtocolError, match="8 bytes is not whole hashes"):
        r.send(HashReply(id=1, seq=1, hashes=b"\0" * 8))


def test_hash_request_is_checked_before_sending():
    s, _ = handshake()
    with pytest.raises(LocalProtocolError, match="exceeds 4096"):
        s.send(HashRequest(id=1, seq=1, volume="v", offset=0, length=1 << 30, granularity=4096))


def test_decompression_bomb_is_bounded():
    """8 MiB of zeros packs into a few hundred bytes; neither a lying raw_length nor an
    honest one above max_frame may make the receiver inflate it."""
    bomb = unsized_frame(bytes(8 << 20))
    assert len(bomb) < 2000
    for raw_length, match in ((1000, "does not inflate to raw_length 1000"),
                              (8 << 20, "exceeds max_frame")):
        r = streaming_receiver(max_frame=1 << 20)
        r.receive_data(frame(FrameType.RECORDS, records_body(raw_length=raw_length, payload=bomb),
                             flags=1))
        with pytest.raises(RemoteProtocolError, match=match):
            r.next_event()


def test_compressed_records_need_zstd_negotiated():
    plain_welcome = Welcome(version=V, features=0, seq=0, crc=0, node="dc2")
    s, r = handshake(welcome=plain_welcome)
    assert s.features == Feature(0)
    with pytest.raises(LocalProtocolError, match="zstd was not negotiated"):
        s.send(Records(first_seq=1, last_seq=1, payload=b"a" * 1000, compress=True))
    packed = records_body(raw_length=3, payload=zstd.compress(b"abc"))
    r.receive_data(frame(FrameType.RECORDS, packed, flags=1))
    with pytest.raises(RemoteProtocolError, match="COMPRESSED but zstd was not negotiated"):
        r.next_event()


@pytest.mark.parametrize("welcome,match", [
    (struct.pack("<HIQI", V + 1, 0, 0, 0) + text(b"x") + NO_HISTORY,
     f"version {V + 1} is outside the HELLO range {V}..{V}"),
    (struct.pack("<HIQI", V, 3, 0, 0) + text(b"x") + NO_HISTORY, "features 0x3 are not a subset"),
])
def test_welcome_must_answer_the_hello(welcome, match):
    s = Connection(Role.SENDER)
    s.send(HELLO)
    s.receive_data(frame(FrameType.WELCOME, welcome))
    with pytest.raises(RemoteProtocolError, match=match):
        s.next_event()
    assert_failed(s, RemoteProtocolError)


@pytest.mark.parametrize("make,wire,match", [
    (streaming_receiver, frame(FrameType.HELLO, hello_body()),
     "cannot receive HELLO in state streaming"),
    (streaming_receiver, frame(FrameType.ACK, struct.pack("<QQ", 1, 1)), "receiver cannot receive ACK"),
    (hello_received, frame(FrameType.RECORDS, records_body()),
     "cannot receive RECORDS in state hello-received"),
    (streaming_sender, frame(FrameType.RECORDS, records_body()), "sender cannot receive RECORDS"),
    (streaming_sender, frame(FrameType.WELCOME, struct.pack("<HIQI", 1, 0, 0, 0) + text(b"x") + NO_HISTORY),
     "cannot receive WELCOME in state streaming"),
])
def test_receiving_out_of_state_is_a_remote_error(make, wire, match):
    conn = make()
    conn.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()
    assert_failed(conn, RemoteProtocolError)


def test_ack_before_welcome_and_frames_after_close():
    s = Connection(Role.SENDER)
    s.send(HELLO)
    s.receive_data(frame(FrameType.ACK, struct.pack("<QQ", 1, 1)))
    with pytest.raises(RemoteProtocolError, match="cannot receive ACK in state hello-sent"):
        s.next_event()
    s = Connection(Role.SENDER)
    s.send(HELLO)
    s.receive_data(frame(FrameType.REFUSE, struct.pack("<H", 6) + text(b"busy"))
                   + frame(FrameType.WELCOME, struct.pack("<HIQI", 1, 0, 0, 0) + text(b"x") + NO_HISTORY))
    assert isinstance(s.next_event(), Refuse)
    with pytest.raises(RemoteProtocolError, match="cannot receive WELCOME in state closed"):
        s.next_event()


# ---- local errors -------------------------------------------------------------------------

@pytest.mark.parametrize("make,event,match", [
    (lambda: Connection(Role.SENDER), Records(first_seq=1, last_seq=1, payload=b""),
     "sender cannot send RECORDS in state start"),
    (lambda: Connection(Role.RECEIVER), Ack(seq=1, durable=1), "receiver cannot send ACK in state start"),
    (lambda: Connection(Role.RECEIVER), WELCOME, "cannot send WELCOME in state start"),
    (lambda: Connection(Role.SENDER), WELCOME, "sender cannot send WELCOME"),
    (lambda: Connection(Role.SENDER), Heartbeat(sent_ns=1), "cannot send HEARTBEAT in state start"),
    (hello_received, Ack(seq=1, durable=1), "cannot send ACK in state hello-received"),
    (hello_received, Records(first_seq=1, last_seq=1, payload=b""), "receiver cannot send RECORDS"),
    (streaming_sender, HELLO, "cannot send HELLO in state streaming"),
    (streaming_sender, Ack(seq=3, durable=3), "sender cannot send ACK"),
    (streaming_receiver, Retain(seq=3), "receiver cannot send RETAIN"),
    (streaming_receiver, Refuse(code=6, reason="late"), "cannot send REFUSE in state streaming"),
    (lambda: Connection(Role.SENDER),
     Hello(proto_min=1, proto_max=1, features=0, node="n" * 256, group="g", target="t"),
     "field node is 256 bytes, more than 255"),
    (lambda: Connection(Role.SENDER),
     Hello(proto_min=1, proto_max=1, features=0, node="\ud800", group="g", target="t"),
     "field node cannot be encoded as UTF-8"),
    (lambda: Connection(Role.SENDER),
     Hello(proto_min=2, proto_max=1, features=0, node="a", group="g", target="t"),
     "proto_min 2 > proto_max 1"),
    (lambda: Connection(Role.SENDER),
     Hello(proto_min=70000, proto_max=70000, features=0, node="a", group="g", target="t"),
     "field proto_min=70000 does not fit in 16 unsigned bits"),
    (streaming_receiver, Ack(seq=-1, durable=-1), "field seq=-1 does not fit in 64"),
    (streaming_receiver, Ack(seq=2**64, durable=2**64), "field seq=18446744073709551616 does not fit"),
    (streaming_sender, Records(first_seq=1, last_seq=2**64, payload=b""), "last_seq"),
    (hello_received, Welcome(version=V + 1, features=0, seq=0, crc=0, node="x"),
     f"WELCOME version {V + 1} is outside the HELLO range {V}..{V}"),
    (hello_received, Welcome(version=V, features=2, seq=0, crc=0, node="x"),
     "features 0x2 are not a subset of the HELLO features 0x1"),
    (hello_received, Welcome(version=V, features=0, seq=0, crc=2**32, node="x"), "field crc"),
    (streaming_sender, "not a frame", "str is not a frame"),
])
def test_sending_out_of_state_or_unencodable_is_a_local_error(make, event, match):
    conn = make()
    with pytest.raises(LocalProtocolError, match=match):
        conn.send(event)
    assert_failed(conn, LocalProtocolError)


def test_feeding_without_draining_is_bounded():
    s, r = handshake(max_frame=1000)
    one = s.send(Records(first_seq=42, last_seq=42, payload=b"q" * 900))
    r.receive_data(one)
    r.receive_data(one)  # 1 frame buffered, below the bound
    with pytest.raises(LocalProtocolError, match="call next_event"):
        r.receive_data(one)
    assert r.state == State.ERROR


def test_data_after_eof_is_a_local_error():
    r = Connection(Role.RECEIVER)
    r.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        r.receive_data(b"x")


# ---- EOF ----------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [1, HEADER_SIZE - 1, HEADER_SIZE, len(GOOD_HELLO) - 1])
def test_eof_mid_frame_is_truncation(keep):
    r = Connection(Role.RECEIVER)
    r.receive_data(GOOD_HELLO[:keep])
    assert r.next_event() is NEED_DATA
    r.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated frame"):
        r.next_event()
    assert r.state == State.ERROR


@pytest.mark.parametrize("make", [lambda: Connection(Role.SENDER),
                                  lambda: Connection(Role.RECEIVER),
                                  hello_received, streaming_sender, streaming_receiver])
def test_eof_between_frames_closes_in_any_state(make):
    conn = make()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.state == State.CLOSED


# ---- negotiation --------------------------------------------------------------------------

def test_negotiate():
    assert negotiate(HELLO, V, V, Feature.ZSTD) == (V, Feature.ZSTD)
    assert negotiate(HELLO, V, V, 0) == (V, Feature(0))
    # A protocol 1 peer and this version have no version in common.
    assert negotiate(HELLO, 1, 1, Feature.ZSTD) is None
    assert (PROTOCOL_MIN, PROTOCOL_MAX) == (3, 3)
    # Nor a protocol 2 peer (8-byte CRC region hashes), either way round.
    v2 = Hello(proto_min=2, proto_max=2, features=Feature.ZSTD, node="a", group="g", target="b")
    assert negotiate(v2, PROTOCOL_MIN, PROTOCOL_MAX, Feature.ZSTD) is None
    assert negotiate(HELLO, 2, 2, Feature.ZSTD) is None
    far = Hello(proto_min=3, proto_max=5, features=0, node="a", group="g", target="b")
    assert negotiate(far, 1, 2, Feature.ZSTD) is None
    assert negotiate(far, 6, 9, Feature.ZSTD) is None
    assert negotiate(far, 1, 4, Feature.ZSTD) == (4, Feature(0))
    assert negotiate(far, 5, 9, 0) == (5, Feature(0))


def test_defaults():
    conn = Connection(Role.SENDER)
    assert conn.max_frame == DEFAULT_MAX_FRAME == 64 * 1024 * 1024
    assert conn.our_role == Role.SENDER and conn.state == State.START
    assert repr(NEED_DATA) == "NEED_DATA"


def test_records_flow_back_only_on_a_fetch_connection():
    hello = Hello(proto_min=1, proto_max=1, features=Feature.FETCH, node="c", group="db",
                  target="k", seq=5)
    welcome = Welcome(version=1, features=Feature.FETCH, seq=9, crc=1, node="k")
    s, r = handshake(hello, welcome)
    assert s.state == r.state == State.FETCH_READY
    with pytest.raises(LocalProtocolError, match="receiver cannot send RECORDS in state fetch-ready"):
        Connection.send(handshake(hello, welcome)[1], Records(first_seq=6, last_seq=6, payload=b"x"))
    r.receive_data(s.send(Fetch(seq=5, crc=1)))
    assert r.next_event() == Fetch(seq=5, crc=1)
    s.receive_data(r.send(Records(first_seq=6, last_seq=6, payload=b"x")) + r.send(Ack(seq=9, durable=9)))
    assert isinstance(s.next_event(), Records) and s.next_event() == Ack(seq=9, durable=9)
    assert s.state == r.state == State.CLOSED
    with pytest.raises(LocalProtocolError, match="sender cannot send FETCH in state closed"):
        s.send(Fetch(seq=5, crc=1))
    plain_s, plain_r = handshake()
    with pytest.raises(LocalProtocolError, match="receiver cannot send RECORDS"):
        plain_r.send(Records(first_seq=1, last_seq=1, payload=b"x"))
    with pytest.raises(LocalProtocolError, match="sender cannot send FETCH"):
        plain_s.send(Fetch(seq=0, crc=0))


# ---- states and ranges (issue 13, item 6) --------------------------------------------------

class LaxConnection(Connection):
    """Encodes whatever it is given in any state: the bytes a broken or hostile peer
    sends (framing and checksums stay valid)."""

    def _next_state(self, direction, kind, error):
        return self.state

    def _check(self, event, error):
        pass


def hostile(*events) -> bytes:
    lax = LaxConnection(Role.SENDER)
    return b"".join(lax.send(ev) for ev in events)


def test_a_resync_pass_walks_its_states():
    s, r = handshake()  # the receiver is at seq 41
    r.receive_data(s.send(ResyncBegin(seq=41)) + s.send(ResyncData(volume="v", offset=0, payload=b"x"))
                   + s.send(ResyncBegin(seq=45)))
    assert drain(r)[-1] == ResyncBegin(seq=45) and s.state == r.state == State.RESYNCING
    with pytest.raises(LocalProtocolError, match="cannot send RECORDS in state resyncing"):
        s.send(Records(first_seq=42, last_seq=42, payload=b""))
    s, r = handshake()  # that failed s for good: again
    r.receive_data(s.send(ResyncBegin(seq=45)))
    drain(r)
    r.receive_data(s.send(ResyncDone(seq=45, crc=7)))
    assert drain(r) == [ResyncDone(seq=45, crc=7)] and r.state == State.RESYNC_DONE
    s.receive_data(r.send(ResyncAck(count=1)) + r.send(Ack(seq=45, durable=45)))
    assert drain(s) == [ResyncAck(count=1), Ack(seq=45, durable=45)]
    assert s.state == r.state == State.STREAMING
    r.receive_data(s.send(Records(first_seq=46, last_seq=46, payload=b"r")))
    assert drain(r)[0].first_seq == 46


HOSTILE = [
    ("resync done with no resync", [ResyncDone(seq=2**64 - 1, crc=0)],
     "cannot receive RESYNC_DONE in state streaming"),
    ("resync data with no resync", [ResyncData(volume="v", offset=0, payload=b"x")],
     "cannot receive RESYNC_DATA in state streaming"),
    ("resync done off its pass", [ResyncBegin(seq=50), ResyncDone(seq=51, crc=0)],
     "RESYNC_DONE at seq 51, but the resync pass began towards seq 50"),
    ("pass going back", [ResyncBegin(seq=50), ResyncBegin(seq=49)], "passes only go forward"),
    ("pass to an impossible seq", [ResyncBegin(seq=2**63)], "exceeds the highest seq"),
    ("records in a resync", [ResyncBegin(seq=50), Records(first_seq=42, last_seq=42, payload=b"")],
     "cannot receive RECORDS in state resyncing"),
    ("records after a handover", [Handover(seq=41), Records(first_seq=42, last_seq=42, payload=b"")],
     "cannot receive RECORDS in state handing-over"),
    ("handover past the stream", [Handover(seq=2**64 - 1)], "exceeds the highest seq"),
    ("handover of unsent records", [Handover(seq=42)], "HANDOVER of seq 42, past seq 41"),
    ("successor past the stream", [Successor(seq=99, node="c")], "SUCCESSOR of seq 99, past"),
    ("retain of unsent records", [Retain(seq=42)], "RETAIN of seq 42, past seq 41"),
    ("records with a gap", [Records(first_seq=43, last_seq=43, payload=b"")], "gap after seq 41"),
    ("records at an impossible seq", [Records(first_seq=42, last_seq=2**64 - 1, payload=b"")],
     "last_seq 18446744073709551615 exceeds"),
    ("current-image hash outside a resync",
     [HashRequest(id=1, seq=ANY_SEQ, volume="v", offset=0, length=1, granularity=1)],
     "ANY_SEQ\\) outside a resync"),
    ("in-band hash during a resync",
     [ResyncBegin(seq=41), HashRequest(id=1, seq=41, volume="v", offset=0, length=1, granularity=1)],
     "only ANY_SEQ"),
    ("hash id twice",
     [HashRequest(id=1, seq=41, volume="v", offset=0, length=1, granularity=1)] * 2,
     "id 1 is already outstanding"),
    ("fetch on a streaming connection", [Fetch(seq=1, crc=0)], "cannot receive FETCH"),
    ("processed without the feature", [Processed(target="far", first_seq=42, last_seq=42, payload=b"")],
     "did not agree Feature.PROCESSED"),
    ("offload in a resync", [ResyncBegin(seq=41), Offload(target="far", ops=1)],
     "cannot receive OFFLOAD in state resyncing"),
    ("mismatch down", [Mismatch(seq=41, volume="v", offset=0, length=1)],
     "cannot receive MISMATCH in state streaming"),
    ("report down", [Report(report={})], "cannot receive REPORT in state streaming"),
]


@pytest.mark.parametrize("events,match", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_frames_out_of_state_or_range_are_refused_both_ways(events, match):
    """The receiver refuses what a hostile sender puts on the wire, and an honest sender
    refuses to send it in the first place (the same table and checks on both ends)."""
    s, r = handshake()
    r.receive_data(hostile(*events))
    with pytest.raises(RemoteProtocolError, match=match):
        drain(r)
    assert_failed(r, RemoteProtocolError)
    s.receive_data(r.send_failure())  # the last words: what the peer did wrong
    (farewell,) = drain(s)
    assert farewell.code == Refusal.PROTOCOL and re.search(match, farewell.message), farewell
    assert r.state == State.ERROR and s.state == State.CLOSED
    s = handshake()[0]
    with pytest.raises(LocalProtocolError, match=match.replace("receive", "send")):
        for ev in events:
            s.send(ev)


UP_HOSTILE = [
    ("ack past the stream", [Ack(seq=42, durable=42)], "ACK of seq 42, past seq 41"),
    ("ack at an impossible seq", [Ack(seq=2**64 - 1, durable=2**64 - 1)], "exceeds the highest seq"),
    ("unasked hash reply", [HashReply(id=9, seq=41, hashes=b"")], "no HASH_REQUEST asked for"),
    ("resync ack with no resync", [ResyncAck(count=1)], "cannot receive RESYNC_ACK in state streaming"),
    ("records to the sender", [Records(first_seq=42, last_seq=42, payload=b"")],
     "sender cannot receive RECORDS in state streaming"),
]


@pytest.mark.parametrize("events,match", [c[1:] for c in UP_HOSTILE], ids=[c[0] for c in UP_HOSTILE])
def test_a_hostile_receiver_is_refused_too(events, match):
    s = handshake()[0]
    s.receive_data(hostile(*events))
    with pytest.raises(RemoteProtocolError, match=match):
        drain(s)


# ---- processing offload (issue 17) ------------------------------------------------------

OFFLOADING = (Hello(proto_min=V, proto_max=V, features=Feature.ZSTD | Feature.PROCESSED, node="dc1",
                    group="db", target="dc3"),
              Welcome(version=V, features=Feature.PROCESSED, seq=41, crc=0, node="dc3"))


def processed(first, last):
    return Processed(target="dc3", first_seq=first, last_seq=last, payload=b"run")


def test_processed_records_down_a_stream_that_agreed_them():
    s, r = handshake(*OFFLOADING)
    evs = [processed(42, 43), Records(first_seq=44, last_seq=44, payload=b""), processed(44, 45),
           processed(42, 42)]  # resent after what it holds: no gap
    r.receive_data(b"".join(s.send(ev) for ev in evs))
    assert drain(r) == evs and s.state == r.state == State.STREAMING
    s.receive_data(r.send(Ack(seq=45, durable=45)))
    assert drain(s) == [Ack(seq=45, durable=45)]


def test_processed_records_down_leave_no_gap():
    s, r = handshake(*OFFLOADING)
    r.receive_data(hostile(processed(43, 43)))
    with pytest.raises(RemoteProtocolError, match="PROCESSED 43..43 leave a gap after seq 41"):
        drain(r)
    s = handshake(*OFFLOADING)[0]
    with pytest.raises(LocalProtocolError, match="PROCESSED 43..43 leave a gap after seq 41"):
        s.send(processed(43, 43))


def test_processed_records_up_name_only_seqs_the_stream_sent():
    s, r = handshake()  # up needs no feature: the near node answers its own source
    r.receive_data(s.send(Records(first_seq=42, last_seq=44, payload=b"")))
    drain(r)
    s.receive_data(r.send(processed(1, 41)) + r.send(processed(42, 44)))
    assert drain(s) == [processed(1, 41), processed(42, 44)]
    with pytest.raises(LocalProtocolError, match="PROCESSED 44..45 past seq 44, the highest"):
        r.send(processed(44, 45))
    s.receive_data(hostile(processed(44, 45)))
    with pytest.raises(RemoteProtocolError, match="PROCESSED 44..45 past seq 44, the highest"):
        drain(s)


UP_ON_ITS_OWN = [Offload(target="dc3", ops=1), processed(40, 41), Report(report={"lag": [1, 2.5]})]


@pytest.mark.parametrize("move", [[ResyncBegin(seq=41)], [ResyncBegin(seq=41), ResyncDone(seq=41, crc=0)],
                                  [Handover(seq=41)]], ids=["resync", "resync-done", "handover"])
def test_what_a_receiver_sends_on_its_own_crosses_the_frames_that_move_the_session(move):
    s, r = handshake()
    down = b"".join(s.send(ev) for ev in move)  # the sender has moved on, the receiver not yet
    up = b"".join(r.send(ev) for ev in UP_ON_ITS_OWN)
    s.receive_data(up)
    assert drain(s) == UP_ON_ITS_OWN
    r.receive_data(down)
    assert drain(r) == move and r.state == s.state != State.STREAMING
    s.receive_data(b"".join(r.send(ev) for ev in UP_ON_ITS_OWN))  # and once both have
    assert drain(s) == UP_ON_ITS_OWN


def test_a_mismatch_goes_up_in_streaming_only():
    s, r = handshake()
    s.receive_data(r.send(Mismatch(seq=41, volume="v", offset=0, length=512)))
    assert drain(s) == [Mismatch(seq=41, volume="v", offset=0, length=512)]
    r.receive_data(s.send(ResyncBegin(seq=41)))
    drain(r)
    with pytest.raises(LocalProtocolError, match="receiver cannot send MISMATCH in state resyncing"):
        r.send(Mismatch(seq=41, volume="v", offset=0, length=512))
    s.receive_data(hostile(Mismatch(seq=41, volume="v", offset=0, length=512)))
    with pytest.raises(RemoteProtocolError, match="sender cannot receive MISMATCH in state resyncing"):
        drain(s)
    s = handshake()[0]
    with pytest.raises(LocalProtocolError, match="sender cannot send MISMATCH"):
        s.send(Mismatch(seq=41, volume="v", offset=0, length=512))


@pytest.mark.parametrize("body,match", [
    (b"[1, 2]", "REPORT is a JSON list, not an object"),
    (b'"lag"', "REPORT is a JSON str, not an object"),
    (b"null", "REPORT is a JSON NoneType, not an object"),
    (b'{"lag": ', "REPORT is not JSON"),
    (b"", "REPORT is not JSON"),
    (b'{"\xff": 1}', "REPORT is not JSON"),
    (b"[" * 100_000, "REPORT is not JSON"),  # nested past the parser's recursion limit
    (b'{"a": ' * 100_000, "REPORT is not JSON"),
    (b'{"lag": ' + b"9" * 5000 + b"}", "REPORT is not JSON"),  # past int digits limit
])
def test_a_report_is_a_json_object(body, match):
    s = handshake()[0]
    s.receive_data(frame(FrameType.REPORT, body))
    with pytest.raises(RemoteProtocolError, match=match):
        drain(s)
    assert_failed(s, RemoteProtocolError)


if given is not None:
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                     st.integers(1, 3000).map(lambda n: b"[" * n)))
    def test_a_report_body_is_an_object_or_a_remote_error(body):
        try:
            ev = decode_body(FrameType.REPORT, 0, memoryview(body), max_frame=DEFAULT_MAX_FRAME)
        except RemoteProtocolError as exc:
            assert "REPORT is" in str(exc)
        else:
            assert isinstance(ev.report, dict) and ev.report == json.loads(body)


def test_a_report_that_is_not_json_is_not_sent():
    r = handshake()[1]
    with pytest.raises(LocalProtocolError, match="REPORT is not JSON"):
        r.send(Report(report={"when": object()}))


def test_the_ack_of_resync_done_must_name_its_seq():
    s, r = handshake()
    r.receive_data(s.send(ResyncBegin(seq=41)) + s.send(ResyncDone(seq=41, crc=0)))
    drain(r)
    s.receive_data(hostile(Ack(seq=40, durable=40)))
    with pytest.raises(RemoteProtocolError, match="ACK of seq 40 answers RESYNC_DONE of seq 41"):
        drain(s)


def test_successor_and_handover_sessions():
    s, r = handshake()
    r.receive_data(s.send(Successor(seq=41, node="dc3")) + s.send(Handover(seq=41)))
    assert drain(r) == [Successor(seq=41, node="dc3"), Handover(seq=41)]
    s.receive_data(r.send(Ack(seq=41, durable=41)) + r.send(Heartbeat(sent_ns=1)))
    assert drain(s) == [Ack(seq=41, durable=41), Heartbeat(sent_ns=1)]
    assert s.state == r.state == State.HANDING_OVER


def test_code_names_of_known_and_unknown_codes():
    assert code_name(Refusal.STALE) == "STALE" and code_name(10) == "STALE"
    assert code_name(4242) == "code 4242"
    r = handshake()[1]
    r.receive_data(hostile(Error(code=4242, message="newer")))
    assert drain(r) == [Error(code=4242, message="newer")]


# Both ends must agree on every step: whatever one end refuses to send, the other refuses
# to receive (and the reverse), and after each allowed frame both are in the same state.
_DOWN = [Records(first_seq=f, last_seq=f + n, payload=b"") for f in (41, 42, 43) for n in (0, 1)] + [
    Heartbeat(sent_ns=1), ResyncData(volume="v", offset=0, payload=b"x"), Retain(seq=41),
    *(ResyncBegin(seq=q) for q in (41, 42, 44, 2**63)), *(ResyncDone(seq=q, crc=0) for q in (41, 42, 44)),
    *(HashRequest(id=i, seq=q, volume="v", offset=0, length=1, granularity=1)
      for i in (1, 2) for q in (41, ANY_SEQ)),
    Handover(seq=41), Handover(seq=43), Successor(seq=42, node="c"), Fetch(seq=1, crc=0),
    Offload(target="far", ops=3), Processed(target="far", first_seq=42, last_seq=42, payload=b"p")]
_UP = [*(Ack(seq=q, durable=q) for q in (40, 41, 42, 43, 44, 2**63)), Heartbeat(sent_ns=2), ResyncAck(count=1),
       *(HashReply(id=i, seq=41, hashes=b"") for i in (1, 2)), Diverged(fork=1, complete=True),
       Records(first_seq=42, last_seq=42, payload=b""), Offload(target="far", ops=0, reason="no"),
       *(Processed(target="far", first_seq=40, last_seq=q, payload=b"p") for q in (41, 43)),
       Mismatch(seq=41, volume="v", offset=0, length=512), Report(report={"node": "dc2"})]
STEPS = [(Role.SENDER, ev) for ev in _DOWN] + [(Role.RECEIVER, ev) for ev in _UP]


def check_lockstep(steps) -> None:
    s, r = handshake()
    ends = {Role.SENDER: (s, r), Role.RECEIVER: (r, s)}
    for who, ev in steps:
        src, dst = ends[who]
        wire = hostile(ev)
        try:
            src.send(ev)
            sent = True
        except LocalProtocolError:
            sent = False
        dst.receive_data(wire)
        try:
            got = drain(dst)
        except RemoteProtocolError:
            got = None
        assert sent == (got is not None), (who, ev, src.state, dst.state)
        if not sent:
            return
        assert got == [ev] and src.state == dst.state, (ev, src.state, dst.state)


def test_both_ends_agree_on_random_streams():
    rng = random.Random(13)
    for _ in range(400):
        check_lockstep([rng.choice(STEPS) for _ in range(rng.randint(1, 12))])


if given is not None:
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(STEPS), max_size=16))
    def test_both_ends_agree_property(steps):
        check_lockstep(steps)


def test_send_failure_is_only_for_a_connection_the_peer_broke():
    s, _ = handshake()
    with pytest.raises(LocalProtocolError, match="only for a connection the peer broke"):
        s.send_failure()


def test_a_handover_of_a_periodic_target_with_a_tiny_interval_is_refused():
    flags, parts = encode_body(Handover(seq=3, targets=(("far", "periodic", "none", "continue",
                                                         0.05),)), max_frame=DEFAULT_MAX_FRAME)
    with pytest.raises(RemoteProtocolError, match="interval of 50 ms"):
        decode_body(FrameType.HANDOVER, flags, memoryview(b"".join(parts)),
                    max_frame=DEFAULT_MAX_FRAME)
