"""The replication connection state machine (sans-IO).

Theory of operation: a SENDER (ships a group's journal) opens with HELLO; the RECEIVER
(the replica) answers WELCOME with its durable position, or REFUSE and closes. Then the
sender streams RECORDS and the receiver answers ACKs; both send HEARTBEATs. ERROR may be
sent or received in any open state and closes the connection.

This module does no I/O: `send(event)` returns the bytes to write, `receive_data(bytes)`
buffers what arrived (b"" = EOF), `next_event()` returns the next event, NEED_DATA or
ConnectionClosed. Every (role, state, direction, frame type) allowed is in TRANSITIONS;
anything else is a LocalProtocolError (we tried to send it) or RemoteProtocolError (the
peer sent it) and the connection goes to ERROR, where every further call raises.
Parsing is bounded: at most one frame of `max_frame` body bytes is buffered, a partial
header stays in the buffer untouched, and decompression never exceeds `max_frame`.
"""

from __future__ import annotations

import enum
import io

import zstandard
from crc32c import crc32c

from .frames import (FLAG_COMPRESSED, FRAME_TYPE, HEADER, HEADER_SIZE, IGNORABLE_FROM, MAGIC,
                     _RECORDS, Error, FrameType, LocalProtocolError, Records,
                     RemoteProtocolError, decode_body, encode_body)


class Role(enum.Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"
    HELLO_RECEIVED = "hello-received"
    STREAMING = "streaming"
    CLOSED = "closed"
    ERROR = "error"


class _Sentinel:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")


class ConnectionClosed:
    """The peer closed its side (EOF between frames)."""

    def __repr__(self):
        return "ConnectionClosed()"


S, R = Role.SENDER, Role.RECEIVER
OUT, IN = "send", "recv"
F = FrameType
TRANSITIONS: dict[tuple[Role, State, str, FrameType], State] = {
    (S, State.START, OUT, F.HELLO): State.HELLO_SENT,
    (S, State.HELLO_SENT, IN, F.WELCOME): State.STREAMING,
    (S, State.HELLO_SENT, IN, F.REFUSE): State.CLOSED,
    (S, State.STREAMING, OUT, F.RECORDS): State.STREAMING,
    (S, State.STREAMING, OUT, F.HEARTBEAT): State.STREAMING,
    (S, State.STREAMING, IN, F.ACK): State.STREAMING,
    (S, State.STREAMING, IN, F.HEARTBEAT): State.STREAMING,
    (R, State.START, IN, F.HELLO): State.HELLO_RECEIVED,
    (R, State.HELLO_RECEIVED, OUT, F.WELCOME): State.STREAMING,
    (R, State.HELLO_RECEIVED, OUT, F.REFUSE): State.CLOSED,
    (R, State.STREAMING, IN, F.RECORDS): State.STREAMING,
    (R, State.STREAMING, IN, F.HEARTBEAT): State.STREAMING,
    (R, State.STREAMING, OUT, F.ACK): State.STREAMING,
    (R, State.STREAMING, OUT, F.HEARTBEAT): State.STREAMING,
}
_OPEN = (State.START, State.HELLO_SENT, State.HELLO_RECEIVED, State.STREAMING)
for _role in Role:
    for _state in _OPEN:
        for _dir in (OUT, IN):
            TRANSITIONS[(_role, _state, _dir, F.ERROR)] = State.CLOSED


class Connection:
    def __init__(self, role: Role, *, max_frame: int = 64 << 20, zstd_level: int = 1):
        self.our_role = role
        self.state = State.START
        self.max_frame = max_frame
        self._buf = bytearray()
        self._eof = False
        self._compressor = zstandard.ZstdCompressor(level=zstd_level)
        self._decompressor = zstandard.ZstdDecompressor()

    # ---- sending -----------------------------------------------------------------------
    def send(self, event) -> bytes:
        kind = FRAME_TYPE.get(type(event))
        if kind is None:
            raise LocalProtocolError(f"{type(event).__name__} is not a frame")
        self._transition(OUT, kind, LocalProtocolError)
        flags = 0
        if kind == F.RECORDS:
            payload = event.payload
            if event.compress:
                payload = self._compressor.compress(payload)
                flags = FLAG_COMPRESSED
            body = _RECORDS.pack(event.first_seq, event.last_seq, len(event.payload)) + payload
        else:
            body = encode_body(event)
        if len(body) > self.max_frame:
            self.state = State.ERROR
            raise LocalProtocolError(f"{kind.name} frame of {len(body)} bytes exceeds {self.max_frame}")
        head = bytearray(HEADER.pack(MAGIC, kind, flags, len(body), 0))
        crc = crc32c(body, crc32c(memoryview(head)[:8]))
        head[8:12] = crc.to_bytes(4, "little")
        return bytes(head) + body

    # ---- receiving ---------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.state == State.ERROR:
            raise RemoteProtocolError("connection is in ERROR state")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data after EOF")
        self._buf += data
        if len(self._buf) > 2 * (self.max_frame + HEADER_SIZE):
            self._fail("peer sent far more than one frame without us reading it")

    def next_event(self):
        if self.state == State.ERROR:
            raise RemoteProtocolError("connection is in ERROR state")
        while True:
            buf = self._buf
            if len(buf) < HEADER_SIZE:
                return self._need_data(partial=bool(buf))
            magic, kind, flags, length, crc = HEADER.unpack_from(buf)
            if magic != MAGIC:
                self._fail(f"bad frame magic 0x{magic:04x}")
            if length > self.max_frame:
                self._fail(f"frame body of {length} bytes exceeds {self.max_frame}")
            end = HEADER_SIZE + length
            if len(buf) < end:
                return self._need_data(partial=True)
            view = memoryview(buf)
            try:
                if crc32c(view[HEADER_SIZE:end], crc32c(view[:8])) != crc:
                    self._fail(f"frame checksum mismatch (type {kind})")
                body = bytes(view[HEADER_SIZE:end])
            finally:
                view.release()
            del buf[:end]
            if kind >= IGNORABLE_FROM:
                continue
            try:
                ftype = FrameType(kind)
            except ValueError:
                self._fail(f"unknown frame type {kind}")
            if flags & ~FLAG_COMPRESSED or (flags and ftype != F.RECORDS):
                self._fail(f"invalid flags 0x{flags:02x} on {ftype.name}")
            try:
                event = (self._records(memoryview(body), flags) if ftype == F.RECORDS
                         else decode_body(ftype, memoryview(body)))
            except RemoteProtocolError as exc:
                self._fail(str(exc))
            self._transition(IN, ftype, RemoteProtocolError)
            return event

    def _need_data(self, partial: bool):
        if not self._eof:
            return NEED_DATA
        if partial:
            self._fail("connection closed in the middle of a frame (truncated frame)")
        if self.state != State.CLOSED:
            self.state = State.CLOSED
        return ConnectionClosed()

    def _records(self, body: memoryview, flags: int) -> Records:
        if len(body) < _RECORDS.size:
            raise RemoteProtocolError("RECORDS body too short")
        first, last, raw_length = _RECORDS.unpack_from(body)
        if not 1 <= first <= last:
            raise RemoteProtocolError(f"RECORDS seq range {first}..{last} is invalid")
        if raw_length > self.max_frame:
            raise RemoteProtocolError(f"RECORDS raw_length {raw_length} exceeds {self.max_frame}")
        payload = body[_RECORDS.size:]
        if flags & FLAG_COMPRESSED:
            payload = self._decompress(bytes(payload), raw_length)
        if len(payload) != raw_length:
            raise RemoteProtocolError(f"RECORDS payload is {len(payload)} bytes, "
                                      f"raw_length says {raw_length}")
        return Records(first_seq=first, last_seq=last, payload=bytes(payload),
                       compress=bool(flags & FLAG_COMPRESSED))

    def _decompress(self, data: bytes, raw_length: int) -> bytes:
        """Decompress at most raw_length + 1 bytes: a frame claiming or holding more is
        refused without ever inflating it (no decompression bombs)."""
        try:
            declared = zstandard.frame_content_size(data)
            if declared not in (-1, raw_length):
                raise RemoteProtocolError(f"RECORDS zstd frame declares {declared} bytes, "
                                          f"raw_length says {raw_length}")
            with self._decompressor.stream_reader(io.BytesIO(data)) as reader:
                return reader.read(raw_length + 1)
        except zstandard.ZstdError as exc:
            raise RemoteProtocolError(f"RECORDS payload does not decompress: {exc}") from None

    # ---- state -------------------------------------------------------------------------
    def _transition(self, direction: str, kind: FrameType, error) -> None:
        nxt = TRANSITIONS.get((self.our_role, self.state, direction, kind))
        if nxt is None:
            where = self.state
            self.state = State.ERROR
            who = "send" if direction == OUT else "receive"
            raise error(f"{self.our_role.value} cannot {who} {kind.name} in state {where.value}")
        self.state = nxt

    def _fail(self, message: str):
        self.state = State.ERROR
        raise RemoteProtocolError(message)
