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

After WELCOME both ends walk the same states, each moved by the frames it sends and
receives (frames in flight the other way are allowed where they can cross):

    STREAMING     RECORDS, RETAIN, SUCCESSOR, HASH_REQUEST(seq) down; ACK, HASH_REPLY,
                  DIVERGED up; HEARTBEAT both ways; processing offload: OFFLOAD both
                  ways, PROCESSED down (relayed to a far target) and up (from a near
                  one), MISMATCH up; REPORT up (also in the states below)
      --RESYNC_BEGIN-->  RESYNCING     RESYNC_BEGIN, RESYNC_DATA, HASH_REQUEST(ANY_SEQ)
                                       down; RESYNC_ACK, HASH_REPLY up
      <-----ACK(seq)---  RESYNC_DONE   after RESYNC_DONE(seq): late RESYNC_ACKs, then
                                       ACK(seq), back to STREAMING
      --HANDOVER------>  HANDING_OVER  nothing more down but heartbeats; ACKs up
    FETCH_READY   (WELCOME agreed FETCH) --FETCH--> FETCHING: RECORDS up, then ACK: CLOSED

Every allowed (role, state, direction, frame type) is a row of TRANSITIONS. Anything
else is a protocol error naming whose fault it is: LocalProtocolError when we try to
send it, RemoteProtocolError when the peer sent it. Either one moves the connection to
State.ERROR, and from then on every call re-raises (the stream can no longer be trusted);
after a RemoteProtocolError, send_failure() still gives one ERROR(PROTOCOL) frame that
tells the peer what it did wrong, to write before closing.
The handshake also fixes what may follow: the version in WELCOME must lie in the HELLO
range, its features must be a subset of the HELLO features, and COMPRESSED RECORDS are
only allowed once ZSTD was agreed.

Ranges, checked both ways: every seq is at most MAX_SEQ; an ACK, RETAIN, HANDOVER or
SUCCESSOR names no seq past the highest this stream has named (WELCOME's position, the
last RECORDS, RESYNC_DONE); RECORDS leave no gap after it; RESYNC_DONE's seq is the seq
of the pass's RESYNC_BEGIN and its ACK repeats it; a HASH_REPLY answers an outstanding
HASH_REQUEST id (at most MAX_HASHES_OUTSTANDING). What only the group can judge (a seq
against the journal, an offset against a volume) is checked where the group is.

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

from .frames import (ANY_SEQ, DEFAULT_MAX_FRAME, HEADER, HEADER_SIZE, MAX_SEQ, Ack, Diverged,
                     Error, Feature, Fetch, Flush, Frame, FrameType, Handover, HashReply, HashRequest,
                     Hello, LocalProtocolError, Processed, ProtocolError, Records, Refusal,
                     RemoteProtocolError, ResyncBegin, ResyncDone, Retain, Successor, Welcome,
                     decode_body, decode_header, encode_body, encode_header)


class Role(enum.Enum):
    SENDER = "sender"  # initiator: ships journal records
    RECEIVER = "receiver"  # responder: the replica


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"  # sender only
    HELLO_RECEIVED = "hello-received"  # receiver only
    STREAMING = "streaming"
    RESYNCING = "resyncing"  # between RESYNC_BEGIN and RESYNC_DONE
    RESYNC_DONE = "resync-done"  # RESYNC_DONE sent, its ACK not yet taken
    HANDING_OVER = "handing-over"  # after HANDOVER: only its ACK (and heartbeats) follow
    FETCH_READY = "fetch-ready"  # WELCOME agreed FETCH: the FETCH request comes next
    FETCHING = "fetching"  # after FETCH: RECORDS up to the sender, then ACK
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
_DOWN, _UP = "down", "up"  # sender -> receiver, receiver -> sender
MAX_HASHES_OUTSTANDING = 256  # HASH_REQUESTs not yet answered, per connection
ZSTD_LEVEL = 1  # RECORDS are compressed on the write path: the fastest level by default

TRANSITIONS: dict[tuple[Role, State, str, FrameType], State] = {
    (_S, State.START, SEND, _F.HELLO): State.HELLO_SENT,
    (_R, State.START, RECV, _F.HELLO): State.HELLO_RECEIVED,
    (_S, State.HELLO_SENT, RECV, _F.WELCOME): State.STREAMING,  # FETCH_READY: see _agree
    (_R, State.HELLO_RECEIVED, SEND, _F.WELCOME): State.STREAMING,
    (_S, State.HELLO_SENT, RECV, _F.REFUSE): State.CLOSED,
    (_R, State.HELLO_RECEIVED, SEND, _F.REFUSE): State.CLOSED,
}
# After WELCOME both ends follow the same rows: (state, which way, frame) -> next state.
_FLOWS = [
    (State.STREAMING, _DOWN, _F.RECORDS, State.STREAMING),
    (State.STREAMING, _DOWN, _F.HEARTBEAT, State.STREAMING),
    (State.STREAMING, _DOWN, _F.HASH_REQUEST, State.STREAMING),  # online verify
    (State.STREAMING, _DOWN, _F.RETAIN, State.STREAMING),
    (State.STREAMING, _DOWN, _F.FLUSH, State.STREAMING),
    (State.STREAMING, _DOWN, _F.SUCCESSOR, State.STREAMING),
    (State.STREAMING, _DOWN, _F.RESYNC_BEGIN, State.RESYNCING),
    (State.STREAMING, _DOWN, _F.HANDOVER, State.HANDING_OVER),
    (State.STREAMING, _UP, _F.ACK, State.STREAMING),
    (State.STREAMING, _UP, _F.HEARTBEAT, State.STREAMING),
    (State.STREAMING, _UP, _F.HASH_REPLY, State.STREAMING),
    (State.STREAMING, _UP, _F.DIVERGED, State.STREAMING),
    (State.STREAMING, _DOWN, _F.OFFLOAD, State.STREAMING),  # processing offload: the ask,
    (State.STREAMING, _DOWN, _F.PROCESSED, State.STREAMING),  # relayed to the far target
    (State.STREAMING, _UP, _F.MISMATCH, State.STREAMING),  # (the far target then closes)
    (State.RESYNCING, _DOWN, _F.RESYNC_BEGIN, State.RESYNCING),  # the next pass
    (State.RESYNCING, _DOWN, _F.RESYNC_DATA, State.RESYNCING),
    (State.RESYNCING, _DOWN, _F.HASH_REQUEST, State.RESYNCING),  # checksum resync
    (State.RESYNCING, _DOWN, _F.HEARTBEAT, State.RESYNCING),
    (State.RESYNCING, _DOWN, _F.RESYNC_DONE, State.RESYNC_DONE),
    (State.RESYNCING, _UP, _F.RESYNC_ACK, State.RESYNCING),
    (State.RESYNCING, _UP, _F.HASH_REPLY, State.RESYNCING),
    (State.RESYNCING, _UP, _F.HEARTBEAT, State.RESYNCING),
    (State.RESYNC_DONE, _DOWN, _F.HEARTBEAT, State.RESYNC_DONE),
    (State.RESYNC_DONE, _UP, _F.RESYNC_ACK, State.RESYNC_DONE),
    (State.RESYNC_DONE, _UP, _F.HEARTBEAT, State.RESYNC_DONE),
    (State.RESYNC_DONE, _UP, _F.ACK, State.STREAMING),
    (State.HANDING_OVER, _DOWN, _F.HEARTBEAT, State.HANDING_OVER),
    (State.HANDING_OVER, _UP, _F.ACK, State.HANDING_OVER),
    (State.HANDING_OVER, _UP, _F.HEARTBEAT, State.HANDING_OVER),
    (State.HANDING_OVER, _UP, _F.HASH_REPLY, State.HANDING_OVER),  # a verify's, crossing
    (State.FETCH_READY, _DOWN, _F.FETCH, State.FETCHING),
    (State.FETCHING, _UP, _F.RECORDS, State.FETCHING),
    (State.FETCHING, _UP, _F.ACK, State.CLOSED),
]
for _state, _way, _kind, _next in _FLOWS:
    TRANSITIONS[(_S, _state, SEND if _way == _DOWN else RECV, _kind)] = _next
    TRANSITIONS[(_R, _state, RECV if _way == _DOWN else SEND, _kind)] = _next
# What a receiver sends up on its own (a near replica's answer to OFFLOAD and its
# processed records, analytics reports) may cross any frame of the sender's that moves
# the session on.
for _state in (State.STREAMING, State.RESYNCING, State.RESYNC_DONE, State.HANDING_OVER):
    for _kind in (_F.OFFLOAD, _F.PROCESSED, _F.REPORT):
        TRANSITIONS[(_S, _state, RECV, _kind)] = _state
        TRANSITIONS[(_R, _state, SEND, _kind)] = _state
# ERROR: either way, in any open state, and it closes the connection.
OPEN_STATES = (State.START, State.HELLO_SENT, State.HELLO_RECEIVED, State.STREAMING,
               State.RESYNCING, State.RESYNC_DONE, State.HANDING_OVER, State.FETCH_READY,
               State.FETCHING)
TRANSITIONS.update({(role, state, direction, _F.ERROR): State.CLOSED
                    for role in Role for state in OPEN_STATES for direction in (SEND, RECV)})


def _framed(kind: FrameType, flags: int, parts: list) -> list:
    """The header (its checksums computed) followed by the body's parts."""
    return [encode_header(kind, flags, parts), *parts]


class Connection:
    """One end of a replication stream, as a sans-IO state machine (h11 style)."""

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME,
                 zstd_level: int = ZSTD_LEVEL):
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        if not 0 < max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame {max_frame} must be 1..2**32-1")
        self.our_role = role
        self.state = State.START
        self.max_frame = max_frame
        self.zstd_level = zstd_level  # of the RECORDS this side sends, when ZSTD is agreed
        self.version: int | None = None  # agreed in the handshake
        self.features: Feature | None = None  # agreed in the handshake
        self._hello: Hello | None = None
        self._top = 0  # the highest seq this stream named (see "Ranges")
        self._pass_seq: int | None = None  # the running resync pass's RESYNC_BEGIN seq
        self._hashes: set[int] = set()  # HASH_REQUEST ids not yet answered
        self._buf = bytearray()
        self._eof = False
        self._failure: ProtocolError | None = None
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
                next_state = self._agree(event, LocalProtocolError, next_state)
            flags, parts = encode_body(event, max_frame=self.max_frame,
                                       compressor=self._compressor)
            self._check(event, LocalProtocolError)
        except LocalProtocolError as exc:
            raise self._fail(exc)
        if kind == _F.HELLO:
            self._hello = event
        self.state = next_state
        return _framed(kind, flags, parts)

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
            next_state = self._agree(event, RemoteProtocolError, next_state)
        self._check(event, RemoteProtocolError)
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
        if next_state is None:
            verb = "send" if direction == SEND else "receive"
            raise error(f"{self.our_role.value} cannot {verb} {kind.name} in state "
                        f"{self.state.value}")
        return next_state

    def _check(self, event: Frame, error: type[ProtocolError]) -> None:
        """The ranges of an event the table allows here (see "Ranges"); keeps what later
        checks need. Raises `error` for an event out of range."""
        kind = event.frame_type
        name = kind.name
        seqs = {"seq": getattr(event, "seq", 0)}
        if isinstance(event, Processed) and (self.our_role == Role.SENDER) == \
                (error is RemoteProtocolError):  # up: what the receiver was sent
            if event.last_seq > self._top:
                raise error(f"PROCESSED {event.first_seq}..{event.last_seq} past seq "
                            f"{self._top}, the highest this stream named")
            return
        if isinstance(event, Processed) and not self.features & Feature.PROCESSED:
            raise error("PROCESSED down a stream that did not agree Feature.PROCESSED")
        if isinstance(event, (Records, Processed)):
            seqs = {"first_seq": event.first_seq, "last_seq": event.last_seq}
        elif isinstance(event, Diverged):
            seqs = {"fork": event.fork}
        elif isinstance(event, (Hello, Welcome)):
            seqs.update({f"history first_seq {i}": first
                         for i, (_, first) in enumerate(event.history)})
        elif isinstance(event, HashRequest) and event.seq == ANY_SEQ:
            seqs = {}
        for field, value in seqs.items():
            if value > MAX_SEQ:
                raise error(f"{name} {field} {value} exceeds the highest seq {MAX_SEQ}")
        if isinstance(event, Welcome):
            self._top = event.seq
        elif isinstance(event, (Records, Processed)):
            if event.first_seq > self._top + 1:
                raise error(f"{name} {event.first_seq}..{event.last_seq} leave a gap after "
                            f"seq {self._top}")
            self._top = max(self._top, event.last_seq)
        elif isinstance(event, (Ack, Retain, Handover, Successor, Flush)):
            if event.seq > self._top:
                raise error(f"{name} of seq {event.seq}, past seq {self._top}, the highest "
                            "this stream named")
            if kind == _F.ACK and event.durable > event.seq:
                raise error(f"ACK says seq {event.durable} is durable but only seq "
                            f"{event.seq} written")
            if kind == _F.ACK and self.state == State.RESYNC_DONE \
                    and event.seq != self._pass_seq:
                raise error(f"ACK of seq {event.seq} answers RESYNC_DONE of seq "
                            f"{self._pass_seq}")
        elif isinstance(event, ResyncBegin):
            if self._pass_seq is not None and event.seq < self._pass_seq:
                raise error(f"RESYNC_BEGIN of seq {event.seq} after a pass to seq "
                            f"{self._pass_seq}: passes only go forward")
            self._pass_seq = event.seq
        elif isinstance(event, ResyncDone):
            if event.seq != self._pass_seq:
                raise error(f"RESYNC_DONE at seq {event.seq}, but the resync pass began "
                            f"towards seq {self._pass_seq}")
            self._top = max(self._top, event.seq)
        elif isinstance(event, HashRequest):
            streaming = self.state == State.STREAMING
            if streaming == (event.seq == ANY_SEQ):
                raise error("HASH_REQUEST " + ("for the current image (ANY_SEQ) outside a resync"
                                               if streaming else f"at seq {event.seq} during a "
                                               "resync (only ANY_SEQ)"))
            if event.id in self._hashes:
                raise error(f"HASH_REQUEST id {event.id} is already outstanding")
            if len(self._hashes) >= MAX_HASHES_OUTSTANDING:
                raise error(f"more than {MAX_HASHES_OUTSTANDING} HASH_REQUESTs outstanding")
            self._hashes.add(event.id)
        elif isinstance(event, HashReply):
            if event.id not in self._hashes:
                raise error(f"HASH_REPLY for id {event.id}, which no HASH_REQUEST asked for")
            self._hashes.discard(event.id)
        elif isinstance(event, Fetch):
            self._top = max(self._top, event.seq)

    def _agree(self, welcome: Welcome, error: type[ProtocolError], next_state: State) -> State:
        """Check a WELCOME against the HELLO it answers and adopt its terms; the state it
        leads to (FETCH_READY on a connection that agreed FETCH)."""
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
            self._compressor = zstandard.ZstdCompressor(level=self.zstd_level)
            self._decompressor = zstandard.ZstdDecompressor()
        return State.FETCH_READY if self.features & Feature.FETCH else next_state

    def send_failure(self) -> bytes:
        """After the peer broke the protocol (this connection failed with a
        RemoteProtocolError): one ERROR(PROTOCOL) frame saying why, to send before closing,
        so that the peer's log tells what it did wrong. The connection stays failed."""
        if not isinstance(self._failure, RemoteProtocolError):
            raise LocalProtocolError("send_failure() is only for a connection the peer broke")
        flags, parts = encode_body(Error(code=Refusal.PROTOCOL, message=str(self._failure)),
                                   max_frame=self.max_frame)
        return b"".join(_framed(_F.ERROR, flags, parts))

    def _check_not_failed(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(f"connection already failed: {self._failure}")

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        """Enter ERROR for good; returns exc for the caller to raise."""
        self.state = State.ERROR
        self._failure = exc
        return exc
