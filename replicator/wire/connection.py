"""The replication connection state machine (sans-IO).

Theory of operation
-------------------
Two roles share one byte stream. The SENDER (initiator) ships a consistency group's
journal; the RECEIVER (responder) is a replica of that group.

    SENDER                                   RECEIVER
    START --HELLO------------------------->  START
    HELLO_SENT                               HELLO_RECEIVED
              <--------------WELCOME-------  (agreed version, features, durable position)
    STREAMING --RECORDS/HEARTBEAT--------->  STREAMING
              <------------ACK/HEARTBEAT---
    or, instead of WELCOME:
              <--------------REFUSE--------  CLOSED (the receiver then closes)
    ERROR frames may go either way in any open state; both ends are then CLOSED.

Every allowed (role, state, direction, frame type) is a row of TRANSITIONS. Anything
else is a protocol error naming whose fault it is: LocalProtocolError when we try to
send it, RemoteProtocolError when the peer sent it. Either one moves the connection to
State.ERROR, and from then on every call re-raises (the stream can no longer be trusted).
The handshake also fixes what may follow: the version in WELCOME must lie in the HELLO
range, its features must be a subset of the HELLO features, and COMPRESSED RECORDS are
only allowed once ZSTD was agreed.

No I/O happens here: `send(event)` returns the bytes to write, `receive_data(data)`
buffers what arrived (b"" = EOF), and `next_event()` returns the next event, NEED_DATA,
or ConnectionClosed once the peer's EOF is reached between frames.

Bounds: a frame header is checked (its own CRC, then the length against max_frame) as
soon as its 16 bytes are in, so a damaged length is refused at once instead of waited
for, and a body above max_frame is never buffered: an incomplete frame never holds
more than max_frame + 16 bytes; feeding
more data while a whole max_frame frame is still waiting to be taken out is refused
too. RECORDS may not inflate past raw_length, and raw_length not past max_frame. Both
peers must use the same max_frame. A partial header is left in the buffer untouched.
Cost per frame: data is appended to one bytearray, the CRC runs over a memoryview, and
a RECORDS payload is copied out of the buffer once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import zstandard
from crc32c import crc32c

from .frames import (DEFAULT_MAX_FRAME, HEADER, HEADER_SIZE, Feature, Frame, FrameType, Hello,
                     LocalProtocolError, ProtocolError, RemoteProtocolError, Welcome,
                     decode_body, decode_header, encode_body, encode_header)


class Role(enum.Enum):
    SENDER = "sender"  # initiator: ships journal records
    RECEIVER = "receiver"  # responder: the replica


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"  # sender only
    HELLO_RECEIVED = "hello-received"  # receiver only
    STREAMING = "streaming"
    CLOSED = "closed"
    ERROR = "error"


class _NeedData:
    """Type of the NEED_DATA sentinel: feed more bytes with receive_data()."""
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side of the stream (EOF between frames)."""


SEND, RECV = "send", "recv"
_S, _R = Role.SENDER, Role.RECEIVER
_F = FrameType

TRANSITIONS: dict[tuple[Role, State, str, FrameType], State] = {
    (_S, State.START, SEND, _F.HELLO): State.HELLO_SENT,
    (_S, State.HELLO_SENT, RECV, _F.WELCOME): State.STREAMING,
    (_S, State.HELLO_SENT, RECV, _F.REFUSE): State.CLOSED,
    (_S, State.STREAMING, SEND, _F.RECORDS): State.STREAMING,
    (_S, State.STREAMING, SEND, _F.HEARTBEAT): State.STREAMING,
    (_S, State.STREAMING, RECV, _F.ACK): State.STREAMING,
    (_S, State.STREAMING, RECV, _F.HEARTBEAT): State.STREAMING,
    (_S, State.STREAMING, SEND, _F.RESYNC_DATA): State.STREAMING,
    (_S, State.STREAMING, SEND, _F.RESYNC_DONE): State.STREAMING,
    (_S, State.STREAMING, RECV, _F.RESYNC_ACK): State.STREAMING,
    (_S, State.STREAMING, SEND, _F.HASH_REQUEST): State.STREAMING,
    (_S, State.STREAMING, RECV, _F.HASH_REPLY): State.STREAMING,
    (_S, State.STREAMING, RECV, _F.DIVERGED): State.STREAMING,
    (_S, State.STREAMING, SEND, _F.HANDOVER): State.STREAMING,
    (_S, State.STREAMING, SEND, _F.FETCH): State.STREAMING,
    (_S, State.STREAMING, SEND, _F.RETAIN): State.STREAMING,
    (_S, State.STREAMING, RECV, _F.RECORDS): State.STREAMING,

    (_R, State.START, RECV, _F.HELLO): State.HELLO_RECEIVED,
    (_R, State.HELLO_RECEIVED, SEND, _F.WELCOME): State.STREAMING,
    (_R, State.HELLO_RECEIVED, SEND, _F.REFUSE): State.CLOSED,
    (_R, State.STREAMING, RECV, _F.RECORDS): State.STREAMING,
    (_R, State.STREAMING, RECV, _F.HEARTBEAT): State.STREAMING,
    (_R, State.STREAMING, SEND, _F.ACK): State.STREAMING,
    (_R, State.STREAMING, SEND, _F.HEARTBEAT): State.STREAMING,
    (_R, State.STREAMING, RECV, _F.RESYNC_DATA): State.STREAMING,
    (_R, State.STREAMING, RECV, _F.RESYNC_DONE): State.STREAMING,
    (_R, State.STREAMING, SEND, _F.RESYNC_ACK): State.STREAMING,
    (_R, State.STREAMING, RECV, _F.HASH_REQUEST): State.STREAMING,
    (_R, State.STREAMING, SEND, _F.HASH_REPLY): State.STREAMING,
    (_R, State.STREAMING, SEND, _F.DIVERGED): State.STREAMING,
    (_R, State.STREAMING, RECV, _F.HANDOVER): State.STREAMING,
    (_R, State.STREAMING, RECV, _F.FETCH): State.STREAMING,
    (_R, State.STREAMING, RECV, _F.RETAIN): State.STREAMING,
    (_R, State.STREAMING, SEND, _F.RECORDS): State.STREAMING,
}
# Rows only a connection that agreed Feature.FETCH may use (journal read from a bunker).
FETCH_ONLY = {Role.SENDER: {_F.FETCH: SEND, _F.RECORDS: RECV},
              Role.RECEIVER: {_F.FETCH: RECV, _F.RECORDS: SEND}}
# ERROR: either way, in any open state, and it closes the connection.
TRANSITIONS.update({(role, state, direction, _F.ERROR): State.CLOSED
                    for role in Role
                    for state in (State.START, State.HELLO_SENT, State.HELLO_RECEIVED,
                                  State.STREAMING)
                    for direction in (SEND, RECV)})


class Connection:
    """One end of a replication stream, as a sans-IO state machine (h11 style)."""

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME, zstd_level: int = 1):
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        if not 0 < max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame {max_frame} must be 1..2**32-1")
        self.our_role = role
        self.state = State.START
        self.max_frame = max_frame
        self.version: int | None = None  # agreed in the handshake
        self.features: Feature | None = None  # agreed in the handshake
        self._hello: Hello | None = None
        self._buf = bytearray()
        self._eof = False
        self._failure: ProtocolError | None = None
        self._zstd_level = zstd_level
        self._compressor: zstandard.ZstdCompressor | None = None
        self._decompressor: zstandard.ZstdDecompressor | None = None

    # ---- sending ------------------------------------------------------------------------
    def send(self, event: Frame) -> bytes:
        """The wire bytes of `event`. Raises LocalProtocolError (and the connection goes
        to ERROR) when the event is not allowed in this state or cannot be encoded."""
        return b"".join(self.send_parts(event))

    def send_parts(self, event: Frame) -> list:
        """Like send(), as the frame header followed by the body's parts uncopied (a
        Records payload is sent as it is, without joining a megabyte to its header)."""
        self._check_not_failed()
        try:
            kind = getattr(type(event), "frame_type", None)
            if not isinstance(kind, FrameType):
                raise LocalProtocolError(f"{type(event).__name__} is not a frame")
            next_state = self._next_state(SEND, kind, LocalProtocolError)
            if kind == _F.WELCOME:
                self._agree(event, LocalProtocolError)
            flags, parts = encode_body(event, max_frame=self.max_frame,
                                       compressor=self._compressor)
        except LocalProtocolError as exc:
            raise self._fail(exc)
        if kind == _F.HELLO:
            self._hello = event
        header = encode_header(kind, flags, parts)
        self.state = next_state
        return [header, *parts]

    # ---- receiving ----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; b"" means the peer closed its side (EOF)."""
        self._check_not_failed()
        if self._eof:
            raise self._fail(LocalProtocolError("receive_data() after EOF"))
        if not data:
            self._eof = True
            return
        if len(self._buf) >= HEADER_SIZE + self.max_frame:
            # The buffer already holds a whole frame (or a header that next_event will
            # reject): the caller must take events out before feeding more.
            raise self._fail(LocalProtocolError(
                f"{len(self._buf)} bytes buffered; call next_event() until NEED_DATA "
                "before receive_data()"))
        self._buf += data

    def next_event(self) -> Frame | ConnectionClosed | _NeedData:
        """The next event from the peer, NEED_DATA, or ConnectionClosed after EOF.
        Raises RemoteProtocolError (and the connection goes to ERROR) on a bad frame."""
        self._check_not_failed()
        try:
            while True:
                event = self._next_frame()
                if event is not None:
                    return event
        except RemoteProtocolError as exc:
            raise self._fail(exc)

    def _next_frame(self):
        """One step of next_event: an event, NEED_DATA/ConnectionClosed, or None after
        skipping an ignorable frame."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return self._out_of_data(partial=bool(buf))
        type_code, flags, length, crc = decode_header(buf, max_frame=self.max_frame)
        end = HEADER_SIZE + length
        if len(buf) < end:
            return self._out_of_data(partial=True)
        with memoryview(buf) as view:
            with view[HEADER_SIZE:end] as body:
                actual = crc32c(body)
                if actual != crc:
                    raise RemoteProtocolError(f"frame body crc mismatch on type 0x{type_code:02x}: "
                                              f"header says 0x{crc:08x}, bytes give 0x{actual:08x}")
                event = decode_body(type_code, flags, body, max_frame=self.max_frame,
                                    decompressor=self._decompressor)
        del buf[:end]  # all views are released: the bytearray may shrink
        if event is None:
            return None  # a frame type >= 0x80 this version does not know: skipped
        next_state = self._next_state(RECV, event.frame_type, RemoteProtocolError)
        if isinstance(event, Hello):
            self._hello = event
        elif isinstance(event, Welcome):
            self._agree(event, RemoteProtocolError)
        self.state = next_state
        return event

    @property
    def missing_bytes(self) -> int:
        """After next_event() returned NEED_DATA: the bytes still to come of the frame
        whose header (checked) is buffered, 0 when no whole header is. What a caller may
        allow time for (the transport's per-frame read deadline)."""
        buf = self._buf
        if len(buf) < HEADER_SIZE or self._failure is not None:
            return 0
        length = HEADER.unpack_from(buf)[3]
        return max(0, HEADER_SIZE + length - len(buf))

    def _out_of_data(self, partial: bool):
        if not self._eof:
            return NEED_DATA
        if partial:
            raise RemoteProtocolError(f"truncated frame: EOF after {len(self._buf)} bytes of "
                                      "an incomplete frame")
        self.state = State.CLOSED
        return ConnectionClosed()

    # ---- state --------------------------------------------------------------------------
    def _next_state(self, direction: str, kind: FrameType, error: type[ProtocolError]) -> State:
        next_state = TRANSITIONS.get((self.our_role, self.state, direction, kind))
        if FETCH_ONLY[self.our_role].get(kind) == direction and \
                not (self.features or 0) & Feature.FETCH:
            next_state = None  # those frames flow "backwards" only on a FETCH connection
        if next_state is None:
            verb = "send" if direction == SEND else "receive"
            raise error(f"{self.our_role.value} cannot {verb} {kind.name} in state "
                        f"{self.state.value}")
        return next_state

    def _agree(self, welcome: Welcome, error: type[ProtocolError]) -> None:
        """Check a WELCOME against the HELLO it answers and adopt its terms."""
        hello = self._hello
        if not hello.proto_min <= welcome.version <= hello.proto_max:
            raise error(f"WELCOME version {welcome.version} is outside the HELLO range "
                        f"{hello.proto_min}..{hello.proto_max}")
        if int(welcome.features) & ~int(hello.features):
            raise error(f"WELCOME features 0x{welcome.features:x} are not a subset of the "
                        f"HELLO features 0x{hello.features:x}")
        self.version = welcome.version
        self.features = Feature(welcome.features)
        if self.features & Feature.ZSTD:
            self._compressor = zstandard.ZstdCompressor(level=self._zstd_level)
            self._decompressor = zstandard.ZstdDecompressor()

    def _check_not_failed(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(f"connection already failed: {self._failure}")

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        """Enter ERROR for good; returns exc for the caller to raise."""
        self.state = State.ERROR
        self._failure = exc
        return exc
