"""Replication protocol frames: byte layout, events, encoding and strict decoding.

Frame = 12-byte header + body, all integers little-endian:

    off size field
    0   2    magic   0x5250
    2   1    type    FrameType
    3   1    flags   bit 0 COMPRESSED (RECORDS only: the payload is one zstd frame)
    4   4    length  body bytes on the wire
    8   4    crc     CRC32C of header bytes 0..8 followed by the body

Bodies (str = u16 byte length + UTF-8, at most 255 bytes unless noted):
    HELLO      proto_min u16, proto_max u16, features u32, node str, group str, target str
    WELCOME    version u16, features u32, seq u64, crc u32, node str
    REFUSE     code u16, reason str (<= 1024 bytes)
    RECORDS    first_seq u64, last_seq u64, raw_length u32, payload (journal records,
               opaque here; zstd-compressed when COMPRESSED, raw_length = decompressed)
    ACK        seq u64
    HEARTBEAT  sent_ns u64
    ERROR      code u16, message str (<= 1024 bytes)
Types 0x80..0xFF are frames a peer may ignore; unknown types below 0x80 are errors.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAGIC = 0x5250
HEADER = struct.Struct("<HBBII")
HEADER_SIZE = HEADER.size  # 12
FLAG_COMPRESSED = 0x01
IGNORABLE_FROM = 0x80
MAX_NAME = 255
MAX_TEXT = 1024


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    RECORDS = 4
    ACK = 5
    HEARTBEAT = 6
    ERROR = 7


class Refusal(enum.IntEnum):
    VERSION = 1
    UNKNOWN_GROUP = 2
    WRONG_SOURCE = 3
    WRONG_TARGET = 4
    NOT_REPLICA = 5
    BUSY = 6
    POSITION = 7
    INTERNAL = 99

    @classmethod
    def of(cls, code: int) -> "Refusal | int":
        try:
            return cls(code)
        except ValueError:
            return code


class Feature(enum.IntFlag):
    ZSTD = 1


class ProtocolError(Exception):
    """Base of the wire layer's errors."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    proto_min: int
    proto_max: int
    features: int
    node: str
    group: str
    target: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Welcome:
    version: int
    features: int
    seq: int
    crc: int
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Refuse:
    code: Refusal | int
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Records:
    first_seq: int
    last_seq: int
    payload: bytes
    compress: bool = False

    def __post_init__(self):
        if not 1 <= self.first_seq <= self.last_seq:
            raise ValueError(f"records {self.first_seq}..{self.last_seq}: need 1 <= first <= last")


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat:
    sent_ns: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Error:
    code: Refusal | int
    message: str


Frame = Hello | Welcome | Refuse | Records | Ack | Heartbeat | Error

FRAME_TYPE = {Hello: FrameType.HELLO, Welcome: FrameType.WELCOME, Refuse: FrameType.REFUSE,
              Records: FrameType.RECORDS, Ack: FrameType.ACK, Heartbeat: FrameType.HEARTBEAT,
              Error: FrameType.ERROR}

_U16 = struct.Struct("<H")
_HELLO = struct.Struct("<HHI")
_WELCOME = struct.Struct("<HIQI")
_RECORDS = struct.Struct("<QQI")
_U64 = struct.Struct("<Q")


def _pack_str(value: str, limit: int = MAX_NAME) -> bytes:
    raw = value.encode()
    if len(raw) > limit:
        raise LocalProtocolError(f"string of {len(raw)} bytes exceeds {limit}")
    return _U16.pack(len(raw)) + raw


class _Body:
    """Strict reader of one frame body: every field must be present and the body must
    end exactly after the last one."""

    def __init__(self, body: memoryview, kind: FrameType):
        self.body, self.pos, self.kind = body, 0, kind

    def fixed(self, st: struct.Struct, what: str) -> tuple:
        if self.pos + st.size > len(self.body):
            raise RemoteProtocolError(f"{self.kind.name} body too short for {what}")
        values = st.unpack_from(self.body, self.pos)
        self.pos += st.size
        return values

    def text(self, what: str, limit: int = MAX_NAME) -> str:
        (n,) = self.fixed(_U16, what)
        if n > limit or self.pos + n > len(self.body):
            raise RemoteProtocolError(f"{self.kind.name} field {what}: bad length {n}")
        raw = bytes(self.body[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{self.kind.name} field {what} is not UTF-8") from None

    def rest(self) -> memoryview:
        out = self.body[self.pos:]
        self.pos = len(self.body)
        return out

    def end(self) -> None:
        if self.pos != len(self.body):
            raise RemoteProtocolError(f"{self.kind.name} body has {len(self.body) - self.pos} "
                                      "trailing bytes")


def encode_body(ev) -> bytes:
    """Body bytes of a frame (RECORDS: the fixed part only; the payload follows)."""
    if isinstance(ev, Hello):
        return (_HELLO.pack(ev.proto_min, ev.proto_max, int(ev.features)) + _pack_str(ev.node)
                + _pack_str(ev.group) + _pack_str(ev.target))
    if isinstance(ev, Welcome):
        return _WELCOME.pack(ev.version, int(ev.features), ev.seq, ev.crc) + _pack_str(ev.node)
    if isinstance(ev, (Refuse, Error)):
        text = ev.reason if isinstance(ev, Refuse) else ev.message
        return _U16.pack(int(ev.code)) + _pack_str(text, MAX_TEXT)
    if isinstance(ev, Ack):
        return _U64.pack(ev.seq)
    if isinstance(ev, Heartbeat):
        return _U64.pack(ev.sent_ns)
    raise LocalProtocolError(f"cannot encode {type(ev).__name__}")


def decode_body(kind: FrameType, body: memoryview):
    """Decode a non-RECORDS body into its event."""
    b = _Body(body, kind)
    if kind == FrameType.HELLO:
        pmin, pmax, features = b.fixed(_HELLO, "versions")
        ev = Hello(proto_min=pmin, proto_max=pmax, features=features, node=b.text("node"),
                   group=b.text("group"), target=b.text("target"))
    elif kind == FrameType.WELCOME:
        version, features, seq, crc = b.fixed(_WELCOME, "position")
        ev = Welcome(version=version, features=features, seq=seq, crc=crc, node=b.text("node"))
    elif kind in (FrameType.REFUSE, FrameType.ERROR):
        (code,) = b.fixed(_U16, "code")
        text = b.text("reason", MAX_TEXT)
        ev = (Refuse(code=Refusal.of(code), reason=text) if kind == FrameType.REFUSE
              else Error(code=Refusal.of(code), message=text))
    elif kind == FrameType.ACK:
        ev = Ack(seq=b.fixed(_U64, "seq")[0])
    elif kind == FrameType.HEARTBEAT:
        ev = Heartbeat(sent_ns=b.fixed(_U64, "sent_ns")[0])
    else:
        raise RemoteProtocolError(f"no decoder for {kind!r}")
    b.end()
    return ev


def negotiate(hello: Hello, supported_min: int, supported_max: int, features: int):
    """(version, features) both sides speak, or None when the ranges are disjoint."""
    low, high = max(hello.proto_min, supported_min), min(hello.proto_max, supported_max)
    if low > high:
        return None
    return high, Feature(hello.features & features)
