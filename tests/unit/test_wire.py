"""The sans-IO replication protocol: sessions between two in-memory connections,
parsers fed whole, byte by byte and with trailing bytes, and every malformed input."""

import struct

import pytest
import zstandard
from crc32c import crc32c

from replicator.wire import (NEED_DATA, Ack, Connection, ConnectionClosed, Error, Feature,
                             Heartbeat, Hello, LocalProtocolError, Records, Refusal, Refuse,
                             RemoteProtocolError, Role, State, Welcome, negotiate)
from replicator.wire.frames import HEADER, MAGIC

HELLO = Hello(proto_min=1, proto_max=1, features=Feature.ZSTD, node="dc1", group="db", target="dc2")
WELCOME = Welcome(version=1, features=Feature.ZSTD, seq=41, crc=0xDEADBEEF, node="dc2")


def pair():
    return Connection(Role.SENDER), Connection(Role.RECEIVER)


def events(conn):
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def session_bytes():
    s, r = pair()
    to_r = [s.send(HELLO)]
    r.receive_data(to_r[0])
    assert events(r) == [HELLO]
    to_s = [r.send(WELCOME)]
    s.receive_data(to_s[0])
    assert events(s) == [WELCOME]
    frames = [Records(first_seq=42, last_seq=44, payload=b"r" * 5000),
              Records(first_seq=45, last_seq=45, payload=b"z" * 70000, compress=True),
              Heartbeat(sent_ns=123)]
    to_r += [s.send(f) for f in frames]
    return to_r, frames


def test_full_session_both_ways():
    s, r = pair()
    r.receive_data(s.send(HELLO))
    assert events(r) == [HELLO] and r.state == State.HELLO_RECEIVED
    s.receive_data(r.send(WELCOME))
    assert events(s) == [WELCOME] and s.state == State.STREAMING
    plain = Records(first_seq=42, last_seq=42, payload=b"abc")
    packed = Records(first_seq=43, last_seq=50, payload=b"x" * 100000, compress=True)
    wire = s.send(plain) + s.send(packed)
    assert len(wire) < 100000  # compressed on the wire
    r.receive_data(wire)
    got = events(r)
    assert got[0] == plain
    assert got[1].payload == packed.payload and got[1].compress and got[1].last_seq == 50
    s.receive_data(r.send(Ack(seq=50)) + r.send(Heartbeat(sent_ns=9)))
    assert events(s) == [Ack(seq=50), Heartbeat(sent_ns=9)]
    r.receive_data(s.send(Error(code=Refusal.INTERNAL, message="bye")))
    assert events(r) == [Error(code=Refusal.INTERNAL, message="bye")] and r.state == State.CLOSED
    s.receive_data(b"")
    assert isinstance(s.next_event(), ConnectionClosed)


@pytest.mark.parametrize("feed", ["whole", "bytewise", "trailing"])
def test_parser_feeding(feed):
    chunks, frames = session_bytes()
    r = Connection(Role.RECEIVER)
    r.receive_data(chunks[0])
    assert events(r) == [HELLO]
    r.send(WELCOME)
    data = b"".join(chunks[1:])
    got = []
    if feed == "whole":
        r.receive_data(data)
        got = events(r)
    elif feed == "bytewise":
        for i in range(len(data)):
            r.receive_data(data[i:i + 1])
            got += events(r)
    else:  # the frames followed by part of the next one
        extra = HEADER.pack(MAGIC, 6, 0, 8, 0)[:7]
        r.receive_data(data + extra)
        got = events(r)
        assert len(r._buf) == 7  # the partial header stays, untouched
    assert len(got) == len(frames)
    for want, ev in zip(frames, got):
        if isinstance(want, Records):
            assert (ev.first_seq, ev.last_seq, ev.payload) == (want.first_seq, want.last_seq, want.payload)
        else:
            assert ev == want


def test_refusal_closes():
    s, r = pair()
    r.receive_data(s.send(HELLO))
    events(r)
    wire = r.send(Refuse(code=Refusal.WRONG_SOURCE, reason="only dc9"))
    assert r.state == State.CLOSED
    s.receive_data(wire)
    (ev,) = events(s)
    assert ev.code == Refusal.WRONG_SOURCE and ev.reason == "only dc9" and s.state == State.CLOSED


def frame(ftype, body, flags=0, crc=None, magic=MAGIC):
    head = bytearray(HEADER.pack(magic, ftype, flags, len(body), 0))
    head[8:12] = struct.pack("<I", crc32c(body, crc32c(bytes(head[:8]))) if crc is None else crc)
    return bytes(head) + body


def hello_body(node=b"dc1"):
    return (struct.pack("<HHI", 1, 1, 0) + struct.pack("<H", len(node)) + node
            + b"\x02\x00db" + b"\x03\x00dc2")


def streaming_receiver():
    s, r = pair()
    r.receive_data(s.send(HELLO))
    events(r)
    r.send(WELCOME)
    return r


@pytest.mark.parametrize("wire,match", [
    (frame(1, hello_body(), magic=0x1234), "magic"),
    (frame(1, hello_body(), crc=1), "checksum"),
    (frame(1, hello_body(), flags=1), "flags"),
    (frame(1, hello_body(), flags=4), "flags"),
    (frame(1, hello_body() + b"X"), "trailing"),
    (frame(1, hello_body()[:-1]), "length"),
    (frame(1, hello_body(node=b"\xff\xfe")), "UTF-8"),
    (frame(0x42, b""), "unknown frame type"),
    (frame(4, b""), "cannot receive|too short"),
    (struct.pack("<HBBII", MAGIC, 1, 0, 1 << 30, 0), "exceeds"),
])
def test_malformed_input_is_a_remote_error(wire, match):
    r = Connection(Role.RECEIVER)
    r.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=match):
        r.next_event()
    assert r.state == State.ERROR
    with pytest.raises(RemoteProtocolError):
        r.next_event()


@pytest.mark.parametrize("body,flags,match", [
    (struct.pack("<QQI", 5, 4, 0), 0, "seq range"),
    (struct.pack("<QQI", 0, 0, 0), 0, "seq range"),
    (struct.pack("<QQI", 1, 1, 10) + b"abc", 0, "raw_length"),
    (struct.pack("<QQI", 1, 1, 10) + b"not zstd at all", 1, "decompress"),
    (struct.pack("<QQI", 1, 1, 10) + zstandard.ZstdCompressor().compress(b"a" * 5000), 1, "declares"),
    (struct.pack("<QQI", 1, 1, 1 << 30) + b"", 1, "exceeds"),
])
def test_bad_records(body, flags, match):
    r = streaming_receiver()
    r.receive_data(frame(4, body, flags=flags))
    with pytest.raises(RemoteProtocolError, match=match):
        r.next_event()


def test_decompression_bomb_without_declared_size_is_bounded():
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = cobj.compress(b"\0" * (8 << 20)) + cobj.flush()
    r = Connection(Role.RECEIVER, max_frame=1 << 20)
    s = Connection(Role.SENDER)
    r.receive_data(s.send(HELLO))
    events(r)
    r.send(WELCOME)
    r.receive_data(frame(4, struct.pack("<QQI", 1, 1, 1000) + bomb, flags=1))
    with pytest.raises(RemoteProtocolError, match="raw_length"):
        r.next_event()


def test_ignorable_frames_are_skipped():
    r = streaming_receiver()
    r.receive_data(frame(0x80, b"future stuff") + frame(6, struct.pack("<Q", 7)))
    assert events(r) == [Heartbeat(sent_ns=7)]


def test_sending_out_of_state_is_a_local_error():
    s, r = pair()
    with pytest.raises(LocalProtocolError):
        s.send(Records(first_seq=1, last_seq=1, payload=b""))
    assert s.state == State.ERROR
    with pytest.raises(LocalProtocolError):
        r.send(Ack(seq=1))  # before HELLO
    s2 = Connection(Role.SENDER)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        s2.send(Hello(proto_min=1, proto_max=1, features=0, node="n" * 300, group="g", target="t"))


def test_receiving_out_of_state_is_a_remote_error():
    s, r = pair()
    s.send(HELLO)
    s.receive_data(frame(5, struct.pack("<Q", 1)))  # ACK before WELCOME
    with pytest.raises(RemoteProtocolError, match="cannot receive ACK"):
        s.next_event()


def test_eof_mid_frame_is_truncation():
    s, r = pair()
    wire = s.send(HELLO)
    r.receive_data(wire[:-3])
    assert r.next_event() is NEED_DATA
    r.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        r.next_event()


def test_records_must_be_ordered():
    with pytest.raises(ValueError):
        Records(first_seq=3, last_seq=2, payload=b"")


def test_negotiate():
    assert negotiate(HELLO, 1, 1, Feature.ZSTD) == (1, Feature.ZSTD)
    assert negotiate(HELLO, 1, 1, 0) == (1, Feature(0))
    far = Hello(proto_min=3, proto_max=5, features=0, node="a", group="g", target="b")
    assert negotiate(far, 1, 2, 0) is None
    assert negotiate(far, 1, 4, 0)[0] == 4
