"""Replication protocol frames: byte layout, events, body encoding and strict decoding.

A frame is a 16-byte header followed by a body; all integers are little-endian:

    off size field
    0   2    magic      0x3252 (b"R2": protocol 2; protocol 1 used 0x5250, b"PR")
    2   1    type       FrameType
    3   1    flags      bit 0 COMPRESSED: the body after its fixed part is one zstd frame.
                        Only RECORDS may set it, and only once ZSTD was negotiated; every
                        other bit must be 0.
    4   4    length     body bytes as on the wire (at most the receiver's max_frame)
    8   4    body_crc   CRC32C of the body as on the wire
    12  4    header_crc CRC32C of bytes 0..12 (magic, type, flags, length, body_crc)

The header has its own checksum (like a journal record's) so that a damaged length is
refused the moment the 16 header bytes are in, never trusted to say how many bytes to
wait for: with one CRC over header and body (protocol 1), a length flipped from 8 to
16 KiB made the receiver wait for a body that never came, while the peer's heartbeats
were taken as part of it. The checks run in this order: magic, header_crc, length
against max_frame; then, once the body is complete, body_crc.

Protocol versions: 3 is the only one spoken (PROTOCOL_MIN = PROTOCOL_MAX = 3). A peer
that speaks 1 is recognised by its magic and refused with a RemoteProtocolError naming
both versions (its frames cannot be checked the new way, and it cannot read ours). A
peer that speaks 2 frames its HELLO as 3 does, so it is refused by negotiation: REFUSE
with code VERSION (its HASH_REPLY carried 8-byte CRC hashes, ours carry xxh3-128, and its ACK had no
durable seq).

Bodies (str = u16 byte length + UTF-8, at most 255 bytes unless noted; a body must end
exactly after its last field):

    type           fixed part                                      then
    1 HELLO        proto_min u16, proto_max u16, features u32,     node str, group str,
                   seq u64                                         target str, history
    2 WELCOME      version u16, features u32, seq u64, crc u32     node str, history
    3 REFUSE       code u16                                        reason str (<= 1024)
    4 RECORDS      first_seq u64, last_seq u64, raw_length u32     payload
    5 ACK          seq u64, durable u64
    6 HEARTBEAT    sent_ns u64
    7 ERROR        code u16                                        message str (<= 1024)
    8 RESYNC_DATA  offset u64                                      volume str, data
    9 RESYNC_DONE  seq u64, crc u32
   10 RESYNC_ACK   count u64
   11 HASH_REQUEST id u64, seq u64, offset u64, length u64,      volume str
                   granularity u32
   12 HASH_REPLY   id u64, seq u64                                 hashes (16 bytes a region)
   13 DIVERGED     fork u64, complete u8                           extents
   14 HANDOVER     seq u64                                         targets
   15 FETCH        seq u64, crc u32
   16 RETAIN       seq u64
   17 RESYNC_BEGIN seq u64                                         (protocol 2)
   18 SUCCESSOR    seq u64                                         node str (protocol 2)
   19 FLUSH        seq u64                                         (protocol 3)
   20 OFFLOAD      ops u8                                          target str, reason str
                                                                   (<= 1024)
   21 PROCESSED    first_seq u64, last_seq u64                     target str, payload
   22 MISMATCH     seq u64, offset u64, length u64                 volume str
   23 REPORT                                                       JSON object (UTF-8)

history = count u16 (at most MAX_GENERATIONS), then count x (id u64, first_seq u64): the
generations the node's image descends from, oldest first (replicator/generations.py).
extents = (volume str, offset u64, length u64) repeated to the end of the body.
targets = (node str, mode str, flags u8: bit 0 zstd, bit 1 on_disconnect block) repeated.
FETCH (sender -> receiver, on a connection whose HELLO asked for Feature.FETCH): send
me your records after seq (whose header CRC must be crc); the receiver answers with
RECORDS (receiver -> sender) and ACK(its last seq), then closes: takeover replay from a
bunker. A sender already past the receiver's last seq gets ACK(that seq) alone and checks
WELCOME's crc against its own record there.
ACK (receiver -> sender): every record through seq is written to the receiver's journal
(what a sync write waits for), every record through durable (<= seq) is durable there
(what a FLUSH waits for, and what the sender's journal may trim). The receiver acks
again as its durable seq catches up. Outside the stream, ACK(seq) answers a frame that
named seq and durable = seq.
FLUSH (sender -> receiver, in STREAMING, seq at most the last seq sent): make every
record through seq durable now and ACK when it is (an NBD FLUSH or FUA write on the
primary waits for it); many flushes share one fdatasync.
RETAIN (sender -> receiver, to a bunker, in STREAMING, seq at most the last seq sent):
every far replica of the sender holds the records through seq; the bunker may drop them,
and must keep every later one for a takeover replay.
HANDOVER (sender -> receiver, after every record through seq): planned switchover; the
receiver, holding exactly seq, becomes the primary with these targets and answers
ACK(seq); the sender then demotes itself.
SUCCESSOR (sender -> receiver, after every record through seq, before the HANDOVER to
`node`): the sender, the receiver's source, names `node` as the next primary; the
receiver, holding exactly seq, answers ACK(seq) and from then on takes `node` as its
source once it connects as the primary of a generation that begins at seq + 1 (and only
then). This is how a switchover moves the other replicas: a peer claiming a newer
generation is never taken as a source on its own word.
DIVERGED (receiver -> sender, right after WELCOME, only when the histories say the
receiver holds records past `fork` that the sender's line does not have): the regions
those records wrote (complete = 1), or complete = 0 when the receiver no longer knows
them all; the sender then resyncs those regions (or checks every region) too.

Processing offload (seed 000, replicator/offload/): OFFLOAD (sender -> receiver, in
STREAMING) asks a near replica to process every record it receives from now on for the
far target `target` (ops: offload/codec.py's Op bits); the receiver answers with OFFLOAD
naming the ops it will do (0, and why in `reason`, when it will not). PROCESSED
(receiver -> sender) then carries the processed form of records first_seq..last_seq
for `target` (offload/codec.py: its payload is opaque here); the sender relays it
verbatim to the far target (sender -> receiver, in STREAMING, in place of the RECORDS
of the same seqs: no gap after the last seq sent, like RECORDS). MISMATCH (receiver ->
sender, then the receiver closes): the processed write at `seq` was made against
content the receiver does not hold at volume [offset, +length): it was not applied;
the sender resyncs that region.
REPORT (receiver -> sender, in any state of a session after WELCOME): the receiver's
analytics and those of the nodes below it (replicator/analytics.py), a JSON object.

Resync (sender -> receiver, instead of RECORDS): RESYNC_BEGIN(seq) opens a pass that
brings the receiver to the sender's image after `seq` (each later pass names a seq at
least as high); RESYNC_DATA carries the current content of one dirty region;
RESYNC_ACK(count) says the first `count` RESYNC_DATA frames of this connection are
durable on the receiver; RESYNC_DONE says the receiver now holds the sender's image
after `seq`, which must be the seq of the last RESYNC_BEGIN (header CRC `crc`): it
rebases its journal there and answers with ACK(seq), after which another pass or
RECORDS from seq + 1 follow. Outside a pass these frames are protocol errors.

Seqs: every seq on the wire (and every generation's first_seq) is at most MAX_SEQ, so a
journal started at any of them still has room to grow; ANY_SEQ is only a HASH_REQUEST's.

Hashes (sender -> receiver, in STREAMING): HASH_REQUEST asks the receiver for the hash
of every `granularity`-sized region of [offset, offset + length) of a volume, taken on
its image after `seq`: the sender sends it after RECORDS through seq and before any
later one, so the receiver hashes exactly the image the sender hashed (online verify
with no false mismatch from writes in flight). seq = ANY_SEQ asks for the current image
(checksum resync, when no RECORDS flow). HASH_REPLY(id) answers with the hashes in
region order (each the XXH3-128 of the region, canonical big-endian bytes; protocol 2
sent 8: CRC32C and CRC-32), or the receiver sends ERROR.

RECORDS: the payload is concatenated journal records, opaque here. raw_length is its
size before compression; when COMPRESSED the payload on the wire is a single zstd frame
that must inflate to exactly raw_length bytes, and raw_length may not exceed max_frame,
so a lying or oversized frame is refused without inflating more than that.
WELCOME carries the receiver's position: its last durable seq and the header CRC of
that record (0, 0 when empty).
Types 0x80..0xFF are reserved for frames a peer may ignore; an unknown type below 0x80
is a protocol error. REFUSE and ERROR codes are open-ended: a code this version does not
know arrives as a bare int (Refusal.of) and is named `code N` (code_name), so new codes
need no new protocol version.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import zstandard
from crc32c import crc32c

MAGIC = 0x3252  # b"R2" on the wire
LEGACY_MAGIC = 0x5250  # b"PR": protocol 1, whose header had no checksum of its own
HEADER = struct.Struct("<HBBIII")  # magic, type, flags, length, body_crc, header_crc
HEADER_SIZE = HEADER.size  # 16
HEADER_CRC_OFFSET = struct.calcsize("<HBBII")  # 12: header_crc covers the bytes before it
_HEADER_CRC = struct.Struct("<I")
FLAG_COMPRESSED = 0x01
IGNORABLE_FROM = 0x80  # types from here up may be skipped by a peer that does not know them
MAX_NAME = 255  # every str field...
MAX_REASON = 1024  # ...except the free text of REFUSE and ERROR
# Protocol 2: the frame header has its own CRC; RESYNC_BEGIN, SUCCESSOR and the states they
# open. Version 1 peers (another header, no resync announcement, no successor) are refused.
# Protocol 3: HASH_REPLY carries 16-byte xxh3-128 region hashes (2: 8-byte CRCs); ACK
# carries the durable seq beside the written one; FLUSH.
PROTOCOL_MIN = PROTOCOL_MAX = 3
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
ANY_SEQ = 2**64 - 1  # HASH_REQUEST: hash the receiver's current image
MAX_SEQ = 2**63 - 1  # the highest seq a peer may name: a journal there still has room
HASH_SIZE = 16  # XXH3-128 of one region (replicator/verify.py)
MAX_HASH_REGIONS = 4096  # per HASH_REQUEST: a reply of at most 64 KiB of hashes
MAX_GENERATIONS = 1024


class FrameType(enum.IntEnum):
    """Frame type numbers: explicit and never reused."""
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    RECORDS = 4
    ACK = 5
    HEARTBEAT = 6
    ERROR = 7
    RESYNC_DATA = 8
    RESYNC_DONE = 9
    RESYNC_ACK = 10
    HASH_REQUEST = 11
    HASH_REPLY = 12
    DIVERGED = 13
    HANDOVER = 14
    FETCH = 15
    RETAIN = 16
    RESYNC_BEGIN = 17
    SUCCESSOR = 18
    FLUSH = 19
    OFFLOAD = 20
    PROCESSED = 21
    MISMATCH = 22
    REPORT = 23


class Refusal(enum.IntEnum):
    """Codes of REFUSE and ERROR frames."""
    VERSION = 1
    UNKNOWN_GROUP = 2
    WRONG_SOURCE = 3
    WRONG_TARGET = 4
    NOT_REPLICA = 5
    BUSY = 6
    POSITION = 7  # diverged from the sender: needs a resync, never an incremental apply
    IDENTITY = 8  # the TLS certificate names another node than HELLO does
    SPLIT_BRAIN = 9  # both nodes were primary after their lines parted
    STALE = 10  # the sender's line is older than the receiver's: it is no primary any more
    UNKNOWN_PEER = 11  # the node is not in the receiver's peers (address book)
    NOT_MEMBER = 12  # the node is a peer, but not a member of this group on the receiver
    PROTOCOL = 13  # the peer broke the protocol (a frame out of its state or range)
    # Codes 14..17 name what the receiver could not take; a peer that predates them reads
    # them as bare ints (`of`, `code_name`) and ends the link as for any ERROR.
    BAD_RECORDS = 14  # a RECORDS batch the journal cannot take (a gap, a batch that lies)
    HASH_REFUSED = 15  # a HASH_REQUEST for a region or an image the receiver does not have
    HANDOVER_REFUSED = 16  # a HANDOVER at another seq than held, or the promotion failed
    SUCCESSOR_REFUSED = 17  # a SUCCESSOR that is no peer, or named at another seq than held
    INTERNAL = 99

    @classmethod
    def of(cls, code: int) -> "Refusal | int":
        """The Refusal for a code off the wire, or the bare int for codes we do not know."""
        try:
            return cls(code)
        except ValueError:
            return code


def code_name(code: "Refusal | int") -> str:
    """The name of a REFUSE or ERROR code, also for codes this version does not know
    (a newer peer's): `code 1234`."""
    try:
        return Refusal(int(code)).name
    except (ValueError, TypeError):
        return f"code {code}"


class Feature(enum.IntFlag):
    ZSTD = 1
    FETCH = 2  # this connection reads the receiver's journal (bunker replay)
    PROCESSED = 4  # the sender may relay processed records (PROCESSED down: offload/)


SUPPORTED_FEATURES = Feature.ZSTD | Feature.FETCH | Feature.PROCESSED


class ProtocolError(Exception):
    """Base of the wire layer's errors."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


# ---- events -----------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """Sender -> receiver, first frame: which group it ships, from where, to where."""
    frame_type: ClassVar[FrameType] = FrameType.HELLO
    proto_min: int
    proto_max: int
    features: int
    node: str
    group: str
    target: str
    seq: int = 0  # the sender's last seq
    history: tuple = ()  # ((id, first_seq), ...) of the sender's image


@dataclass(frozen=True, kw_only=True, slots=True)
class Welcome:
    """Receiver -> sender: the agreed version and features, and the receiver's durable
    position (seq and the header CRC of that record; 0, 0 when empty)."""
    frame_type: ClassVar[FrameType] = FrameType.WELCOME
    version: int
    features: int
    seq: int
    crc: int
    node: str
    history: tuple = ()  # ((id, first_seq), ...) of the receiver's image


@dataclass(frozen=True, kw_only=True, slots=True)
class Refuse:
    """Receiver -> sender instead of WELCOME; the connection is closed afterwards.
    A reason longer than 1024 UTF-8 bytes is cut at a character boundary when sent."""
    frame_type: ClassVar[FrameType] = FrameType.REFUSE
    code: Refusal | int
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Records:
    """Sender -> receiver: journal records first_seq..last_seq, concatenated in payload.
    Sending: compress asks for zstd (it is skipped when it would not shrink the payload).
    Received: payload is the decompressed bytes, compress says how it arrived."""
    frame_type: ClassVar[FrameType] = FrameType.RECORDS
    first_seq: int
    last_seq: int
    payload: bytes
    compress: bool = False

    def __post_init__(self):
        if not 1 <= self.first_seq <= self.last_seq:
            raise ValueError(f"records {self.first_seq}..{self.last_seq}: "
                             "need 1 <= first_seq <= last_seq")

    def __repr__(self):  # payloads are megabytes; never dump them into a log line
        return (f"Records(first_seq={self.first_seq}, last_seq={self.last_seq}, "
                f"payload=<{len(self.payload)} bytes>, compress={self.compress})")


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack:
    """Receiver -> sender: every record <= seq is written on the receiver, every record
    <= durable is durable there."""
    frame_type: ClassVar[FrameType] = FrameType.ACK
    seq: int
    durable: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat:
    """Both ways while streaming; sent_ns is the sender's clock, echoed for RTT only."""
    frame_type: ClassVar[FrameType] = FrameType.HEARTBEAT
    sent_ns: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Error:
    """Both ways in any open state; the connection is closed afterwards.
    A message longer than 1024 UTF-8 bytes is cut at a character boundary when sent."""
    frame_type: ClassVar[FrameType] = FrameType.ERROR
    code: Refusal | int
    message: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ResyncData:
    """Sender -> receiver: the current content of one region of a volume."""
    frame_type: ClassVar[FrameType] = FrameType.RESYNC_DATA
    volume: str
    offset: int
    payload: bytes

    def __repr__(self):
        return f"ResyncData(volume={self.volume!r}, offset={self.offset}, payload=<{len(self.payload)} bytes>)"


@dataclass(frozen=True, kw_only=True, slots=True)
class ResyncDone:
    """Sender -> receiver: the resync is complete at the sender's seq (and its header CRC)."""
    frame_type: ClassVar[FrameType] = FrameType.RESYNC_DONE
    seq: int
    crc: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ResyncAck:
    """Receiver -> sender: the first `count` RESYNC_DATA of this connection are durable."""
    frame_type: ClassVar[FrameType] = FrameType.RESYNC_ACK
    count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class HashRequest:
    """Sender -> receiver: hash the regions of [offset, offset + length) of `volume` on
    the image after `seq` (ANY_SEQ: as it is now)."""
    frame_type: ClassVar[FrameType] = FrameType.HASH_REQUEST
    id: int
    seq: int
    volume: str
    offset: int
    length: int
    granularity: int

    @property
    def regions(self) -> int:
        return -(-self.length // self.granularity) if self.granularity else 0


@dataclass(frozen=True, kw_only=True, slots=True)
class HashReply:
    """Receiver -> sender: the hashes (HASH_SIZE bytes each) HASH_REQUEST `id` asked for."""
    frame_type: ClassVar[FrameType] = FrameType.HASH_REPLY
    id: int
    seq: int
    hashes: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Diverged:
    """Receiver -> sender: the regions its records past `fork` wrote (complete=False:
    not all of them are known any more)."""
    frame_type: ClassVar[FrameType] = FrameType.DIVERGED
    fork: int
    complete: bool
    extents: tuple = ()  # ((volume, offset, length), ...)


@dataclass(frozen=True, kw_only=True, slots=True)
class Handover:
    """Sender -> receiver: become the primary at `seq`, shipping to `targets`
    ((node, mode, compress, on_disconnect, interval), ...; interval: seconds of a periodic
    target, else None)."""
    frame_type: ClassVar[FrameType] = FrameType.HANDOVER
    seq: int
    targets: tuple = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Fetch:
    """Sender -> receiver: send me your records after `seq` (header CRC `crc`)."""
    frame_type: ClassVar[FrameType] = FrameType.FETCH
    seq: int
    crc: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ResyncBegin:
    """Sender -> receiver: a resync pass towards the sender's image after `seq` begins."""
    frame_type: ClassVar[FrameType] = FrameType.RESYNC_BEGIN
    seq: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Successor:
    """Sender (the receiver's source) -> receiver: `node` becomes the primary after `seq`;
    take it as source when it connects with a generation beginning at seq + 1."""
    frame_type: ClassVar[FrameType] = FrameType.SUCCESSOR
    seq: int
    node: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Flush:
    """Sender -> receiver: make every record through `seq` durable, then ACK."""
    frame_type: ClassVar[FrameType] = FrameType.FLUSH
    seq: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Retain:
    """Sender -> bunker: the far replicas hold every record through `seq`."""
    frame_type: ClassVar[FrameType] = FrameType.RETAIN
    seq: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Offload:
    """Sender -> receiver: process what you receive for the far `target` (ops); receiver
    -> sender: the ops it will do (0: none, and why)."""
    frame_type: ClassVar[FrameType] = FrameType.OFFLOAD
    target: str
    ops: int
    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Processed:
    """The processed records first_seq..last_seq for the far `target`: receiver -> sender
    from the near replica, sender -> receiver relayed to the far one."""
    frame_type: ClassVar[FrameType] = FrameType.PROCESSED
    target: str
    first_seq: int
    last_seq: int
    payload: bytes

    def __post_init__(self):
        if not 1 <= self.first_seq <= self.last_seq:
            raise ValueError(f"processed records {self.first_seq}..{self.last_seq}: "
                             "need 1 <= first_seq <= last_seq")

    def __repr__(self):
        return (f"Processed(target={self.target!r}, first_seq={self.first_seq}, "
                f"last_seq={self.last_seq}, payload=<{len(self.payload)} bytes>)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Mismatch:
    """Receiver -> sender: the processed write at `seq` does not apply to what the
    receiver holds at `volume` [offset, +length)."""
    frame_type: ClassVar[FrameType] = FrameType.MISMATCH
    seq: int
    volume: str
    offset: int
    length: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """Receiver -> sender: analytics of the receiver and the nodes below it."""
    frame_type: ClassVar[FrameType] = FrameType.REPORT
    report: dict


Frame = (Hello | Welcome | Refuse | Records | Ack | Heartbeat | Error | ResyncData | ResyncDone
         | ResyncAck | HashRequest | HashReply | Diverged | Handover | Fetch | Retain
         | ResyncBegin | Successor | Flush | Offload | Processed | Mismatch | Report)
_FRAME_CLASSES = Frame.__args__


def negotiate(hello: Hello, supported_min: int, supported_max: int,
              features: int) -> tuple[int, Feature] | None:
    """The highest version and the features both sides speak, or None when the version
    ranges are disjoint (answer with Refuse(code=Refusal.VERSION))."""
    low, high = max(hello.proto_min, supported_min), min(hello.proto_max, supported_max)
    if low > high:
        return None
    return high, Feature(hello.features & features)


# ---- fixed parts and strings --------------------------------------------------------------

class _Fixed:
    """One fixed-size part of a body: a struct.Struct and its field names, so that both
    encoding and decoding errors can name the field."""

    def __init__(self, fmt: str, *names: str):
        self.struct = struct.Struct("<" + fmt)
        self.names = names
        self.limits = [1 << (8 * struct.calcsize("<" + code)) for code in fmt]
        assert len(names) == len(fmt)

    def pack(self, kind: FrameType, *values: int) -> bytes:
        for name, value, limit in zip(self.names, values, self.limits):
            if not isinstance(value, int) or not 0 <= value < limit:
                raise LocalProtocolError(f"{kind.name} field {name}={value!r} does not fit "
                                         f"in {limit.bit_length() - 1} unsigned bits")
        return self.struct.pack(*values)


_HELLO = _Fixed("HHIQ", "proto_min", "proto_max", "features", "seq")
_WELCOME = _Fixed("HIQI", "version", "features", "seq", "crc")
_CODE = _Fixed("H", "code")
_RECORDS = _Fixed("QQI", "first_seq", "last_seq", "raw_length")
RECORDS_FIXED_SIZE = _RECORDS.struct.size  # 20: an uncompressed payload may be max_frame - 20
_ACK = _Fixed("QQ", "seq", "durable")
_HEARTBEAT = _Fixed("Q", "sent_ns")
_RESYNC_DATA = _Fixed("Q", "offset")
_RESYNC_DONE = _Fixed("QI", "seq", "crc")
_RESYNC_ACK = _Fixed("Q", "count")
_HASH_REQUEST = _Fixed("QQQQI", "id", "seq", "offset", "length", "granularity")
_HASH_REPLY = _Fixed("QQ", "id", "seq")
_HISTORY = _Fixed("H", "history count")
_GENERATION = _Fixed("QQ", "generation id", "first_seq")
_DIVERGED = _Fixed("QB", "fork", "complete")
_EXTENT = _Fixed("QQ", "offset", "length")
_HANDOVER = _Fixed("Q", "seq")
_FETCH = _Fixed("QI", "seq", "crc")
_RETAIN = _Fixed("Q", "seq")
_FLUSH = _Fixed("Q", "seq")
_RESYNC_BEGIN = _Fixed("Q", "seq")
_SUCCESSOR = _Fixed("Q", "seq")
_TARGET_FLAGS = _Fixed("B", "target flags")
_INTERVAL = _Fixed("I", "interval")
_OFFLOAD = _Fixed("B", "ops")
_PROCESSED = _Fixed("QQ", "first_seq", "last_seq")
_MISMATCH = _Fixed("QQQ", "seq", "offset", "length")
_STRLEN = struct.Struct("<H")


def _pack_name(kind: FrameType, field: str, value: str) -> bytes:
    """A str field that must arrive intact (names): too long is an error."""
    raw = _utf8(kind, field, value)
    if len(raw) > MAX_NAME:
        raise LocalProtocolError(f"{kind.name} field {field} is {len(raw)} bytes, "
                                 f"more than {MAX_NAME}")
    return _STRLEN.pack(len(raw)) + raw


def _pack_text(kind: FrameType, field: str, value: str, limit: int) -> bytes:
    """A free-text str field (reason, message): cut at a character boundary to fit, so
    reporting an error never fails because the description is long."""
    raw = _utf8(kind, field, value)
    if len(raw) > limit:
        raw = raw[:limit].decode("utf-8", "ignore").encode()
    return _STRLEN.pack(len(raw)) + raw


def _utf8(kind: FrameType, field: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{kind.name} field {field} must be str, "
                                 f"not {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{kind.name} field {field} cannot be encoded as UTF-8 "
                                 "(lone surrogate)") from None


class _Reader:
    """Strict reader of one frame body: every field must be present and the body must
    end exactly after the last one."""

    def __init__(self, kind: FrameType, body: memoryview, flags: int, max_frame: int,
                 decompressor: zstandard.ZstdDecompressor | None):
        self.kind, self.body, self.pos = kind, body, 0
        self.flags, self.max_frame, self.decompressor = flags, max_frame, decompressor

    def fixed(self, part: _Fixed) -> tuple:
        if self.pos + part.struct.size > len(self.body):
            raise RemoteProtocolError(
                f"{self.kind.name} body of {len(self.body)} bytes is too short for "
                f"{', '.join(part.names)}")
        values = part.struct.unpack_from(self.body, self.pos)
        self.pos += part.struct.size
        return values

    def text(self, field: str, limit: int = MAX_NAME) -> str:
        if self.pos + _STRLEN.size > len(self.body):
            raise RemoteProtocolError(f"{self.kind.name} body is too short for {field} length")
        (n,) = _STRLEN.unpack_from(self.body, self.pos)
        self.pos += _STRLEN.size
        if n > limit:
            raise RemoteProtocolError(f"{self.kind.name} field {field} length {n} exceeds {limit}")
        if self.pos + n > len(self.body):
            raise RemoteProtocolError(f"{self.kind.name} field {field} length {n} runs past "
                                      f"the body ({len(self.body) - self.pos} bytes left)")
        raw = bytes(self.body[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(
                f"{self.kind.name} field {field} is not valid UTF-8") from None

    def rest(self) -> memoryview:
        out = self.body[self.pos:]
        self.pos = len(self.body)
        return out

    def at_end(self) -> bool:
        return self.pos == len(self.body)

    def end(self) -> None:
        if self.pos != len(self.body):
            raise RemoteProtocolError(f"{self.kind.name} body has {len(self.body) - self.pos} "
                                      "trailing bytes after its last field")


# ---- header -------------------------------------------------------------------------------

def encode_header(kind: int, flags: int, parts: list) -> bytearray:
    """The 16 header bytes of a frame whose body is `parts` joined (parts are summed in
    place, never joined)."""
    body_crc = 0
    length = 0
    for part in parts:
        body_crc = crc32c(part, body_crc)
        length += len(part)
    header = bytearray(HEADER.pack(MAGIC, kind, flags, length, body_crc, 0))
    with memoryview(header) as view:
        _HEADER_CRC.pack_into(header, HEADER_CRC_OFFSET, crc32c(view[:HEADER_CRC_OFFSET]))
    return header


def decode_header(buf, *, max_frame: int) -> tuple[int, int, int, int]:
    """(type, flags, length, body_crc) of the header at the start of `buf` (at least
    HEADER_SIZE bytes). Raises RemoteProtocolError at once for a header that is not
    intact, so that no byte count from a damaged header is ever waited for."""
    magic, type_code, flags, length, body_crc, header_crc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        if magic == LEGACY_MAGIC:
            raise RemoteProtocolError(
                f"the peer speaks replication protocol 1 (frame magic 0x{LEGACY_MAGIC:04x}); "
                f"this node speaks {PROTOCOL_MIN}..{PROTOCOL_MAX}: upgrade the peer")
        raise RemoteProtocolError(f"bad frame magic 0x{magic:04x} (want 0x{MAGIC:04x})")
    with memoryview(buf) as view, view[:HEADER_CRC_OFFSET] as head:
        actual = crc32c(head)
    if actual != header_crc:
        raise RemoteProtocolError(
            f"frame header crc mismatch: header says 0x{header_crc:08x}, bytes give "
            f"0x{actual:08x}; a damaged header (type 0x{type_code:02x}, length {length}) "
            "is not trusted")
    if length > max_frame:
        raise RemoteProtocolError(f"frame body length {length} exceeds max_frame {max_frame}")
    return type_code, flags, length, body_crc


# ---- one codec per frame type -------------------------------------------------------------

class _Writer:
    """The body of one frame being encoded: parts in wire order (payloads uncopied), the
    frame's flags, and what encoding may need (max_frame, the zstd compressor)."""

    def __init__(self, kind: FrameType, max_frame: int,
                 compressor: zstandard.ZstdCompressor | None):
        self.kind, self.max_frame, self.compressor = kind, max_frame, compressor
        self.flags = 0
        self.parts: list = []

    def fixed(self, part: _Fixed, *values: int) -> None:
        self.parts.append(part.pack(self.kind, *values))

    def name(self, field: str, value: str) -> None:
        self.parts.append(_pack_name(self.kind, field, value))

    def text(self, field: str, value: str) -> None:
        self.parts.append(_pack_text(self.kind, field, value, MAX_REASON))

    def raw(self, data) -> None:
        self.parts.append(data)


@dataclass(frozen=True, slots=True)
class _Codec:
    """How the body of one frame type is written and read. `encode` writes every field
    of the event; `decode` reads them back and checks the type's limits (the reader then
    checks that the body ends exactly there)."""
    encode: Callable[[Any, _Writer], None]
    decode: Callable[[_Reader], Frame]
    compressible: bool = False  # only RECORDS may set FLAG_COMPRESSED


def _write_hello(ev: Hello, out: _Writer) -> None:
    if ev.proto_min > ev.proto_max:
        raise LocalProtocolError(f"HELLO proto_min {ev.proto_min} > proto_max {ev.proto_max}")
    out.fixed(_HELLO, ev.proto_min, ev.proto_max, int(ev.features), ev.seq)
    out.name("node", ev.node)
    out.name("group", ev.group)
    out.name("target", ev.target)
    _write_history(out, ev.history)


def _read_hello(reader: _Reader) -> Hello:
    proto_min, proto_max, features, seq = reader.fixed(_HELLO)
    if proto_min > proto_max:
        raise RemoteProtocolError(f"HELLO proto_min {proto_min} > proto_max {proto_max}")
    return Hello(proto_min=proto_min, proto_max=proto_max, features=features, seq=seq,
                 node=reader.text("node"), group=reader.text("group"),
                 target=reader.text("target"), history=_read_history(reader))


def _write_welcome(ev: Welcome, out: _Writer) -> None:
    out.fixed(_WELCOME, ev.version, int(ev.features), ev.seq, ev.crc)
    out.name("node", ev.node)
    _write_history(out, ev.history)


def _read_welcome(reader: _Reader) -> Welcome:
    version, features, seq, crc = reader.fixed(_WELCOME)
    return Welcome(version=version, features=features, seq=seq, crc=crc,
                   node=reader.text("node"), history=_read_history(reader))


def _code_and_text(cls: type, field: str) -> _Codec:
    """The codec of REFUSE and ERROR: a code (kept as an int when this version does not
    know it) and a free text `field`."""
    def write(ev, out: _Writer) -> None:
        out.fixed(_CODE, int(ev.code))
        out.text(field, getattr(ev, field))

    def read(reader: _Reader) -> Frame:
        (code,) = reader.fixed(_CODE)
        return cls(code=Refusal.of(code), **{field: reader.text(field, MAX_REASON)})
    return _Codec(write, read)


def _write_records(ev: Records, out: _Writer) -> None:
    payload = ev.payload
    raw_length = len(payload)
    # The receiver refuses raw_length > max_frame before inflating anything.
    if raw_length > out.max_frame:
        raise LocalProtocolError(f"RECORDS {ev.first_seq}..{ev.last_seq}: payload of "
                                 f"{raw_length} bytes exceeds max_frame {out.max_frame}")
    if ev.compress:
        if out.compressor is None:
            raise LocalProtocolError("RECORDS compress=True but zstd was not negotiated")
        packed = out.compressor.compress(payload)
        if len(packed) < raw_length:  # incompressible data goes as it is
            payload, out.flags = packed, FLAG_COMPRESSED
    out.fixed(_RECORDS, ev.first_seq, ev.last_seq, raw_length)
    out.raw(payload)


def _read_records(reader: _Reader) -> Records:
    first_seq, last_seq, raw_length = reader.fixed(_RECORDS)
    if first_seq < 1:
        raise RemoteProtocolError(f"RECORDS first_seq {first_seq} must be >= 1")
    if last_seq < first_seq:
        raise RemoteProtocolError(f"RECORDS last_seq {last_seq} < first_seq {first_seq}")
    if raw_length > reader.max_frame:
        raise RemoteProtocolError(f"RECORDS raw_length {raw_length} exceeds max_frame "
                                  f"{reader.max_frame}")
    wire = reader.rest()
    compressed = bool(reader.flags & FLAG_COMPRESSED)
    if compressed:
        if reader.decompressor is None:
            raise RemoteProtocolError("RECORDS is COMPRESSED but zstd was not negotiated")
        payload = _inflate(wire, raw_length, reader.decompressor)
    else:
        if len(wire) != raw_length:
            raise RemoteProtocolError(f"RECORDS payload is {len(wire)} bytes but raw_length "
                                      f"is {raw_length}")
        payload = bytes(wire)  # the one copy out of the receive buffer
    return Records(first_seq=first_seq, last_seq=last_seq, payload=payload, compress=compressed)


def _write_resync_data(ev: ResyncData, out: _Writer) -> None:
    out.fixed(_RESYNC_DATA, ev.offset)
    out.name("volume", ev.volume)
    out.raw(ev.payload)


def _read_resync_data(reader: _Reader) -> ResyncData:
    (offset,) = reader.fixed(_RESYNC_DATA)
    volume = reader.text("volume")
    return ResyncData(volume=volume, offset=offset, payload=bytes(reader.rest()))


def _write_hash_request(ev: HashRequest, out: _Writer) -> None:
    _check_hash_request(ev, LocalProtocolError)
    out.fixed(_HASH_REQUEST, ev.id, ev.seq, ev.offset, ev.length, ev.granularity)
    out.name("volume", ev.volume)


def _read_hash_request(reader: _Reader) -> HashRequest:
    id_, seq, offset, length, granularity = reader.fixed(_HASH_REQUEST)
    event = HashRequest(id=id_, seq=seq, offset=offset, length=length,
                        granularity=granularity, volume=reader.text("volume"))
    _check_hash_request(event, RemoteProtocolError)
    return event


def _write_hash_reply(ev: HashReply, out: _Writer) -> None:
    if len(ev.hashes) % HASH_SIZE:
        raise LocalProtocolError(f"HASH_REPLY of {len(ev.hashes)} bytes is not whole hashes")
    out.fixed(_HASH_REPLY, ev.id, ev.seq)
    out.raw(ev.hashes)


def _read_hash_reply(reader: _Reader) -> HashReply:
    id_, seq = reader.fixed(_HASH_REPLY)
    hashes = bytes(reader.rest())
    if len(hashes) % HASH_SIZE:
        raise RemoteProtocolError(f"HASH_REPLY of {len(hashes)} bytes is not whole hashes")
    return HashReply(id=id_, seq=seq, hashes=hashes)


def _write_diverged(ev: Diverged, out: _Writer) -> None:
    out.fixed(_DIVERGED, ev.fork, int(ev.complete))
    for volume, offset, length in ev.extents:
        out.name("volume", volume)
        out.fixed(_EXTENT, offset, length)


def _read_diverged(reader: _Reader) -> Diverged:
    fork, complete = reader.fixed(_DIVERGED)
    if complete > 1:
        raise RemoteProtocolError(f"DIVERGED complete must be 0 or 1, not {complete}")
    extents = []
    while not reader.at_end():
        volume = reader.text("volume")
        extents.append((volume, *reader.fixed(_EXTENT)))
    return Diverged(fork=fork, complete=bool(complete), extents=tuple(extents))


def _write_handover(ev: Handover, out: _Writer) -> None:
    out.fixed(_HANDOVER, ev.seq)
    for node, mode, compress, on_disconnect, interval in ev.targets:
        out.name("node", node)
        out.name("mode", mode)
        out.fixed(_TARGET_FLAGS, (compress == "zstd") | (on_disconnect == "block") << 1)
        if mode == "periodic":  # its interval, in milliseconds
            out.fixed(_INTERVAL, round(interval * 1000))


def _read_handover(reader: _Reader) -> Handover:
    (seq,) = reader.fixed(_HANDOVER)
    targets = []
    while not reader.at_end():
        node, mode = reader.text("node"), reader.text("mode")
        (flags,) = reader.fixed(_TARGET_FLAGS)
        if flags > 3:
            raise RemoteProtocolError(f"HANDOVER target flags 0x{flags:02x} unknown")
        interval = None
        if mode == "periodic":
            (ms,) = reader.fixed(_INTERVAL)
            if ms < 100:
                raise RemoteProtocolError(f"HANDOVER periodic target {node!r} with an interval "
                                          f"of {ms} ms (at least 100)")
            interval = ms / 1000
        targets.append((node, mode, "zstd" if flags & 1 else "none",
                        "block" if flags & 2 else "continue", interval))
    return Handover(seq=seq, targets=tuple(targets))


def _write_successor(ev: Successor, out: _Writer) -> None:
    out.fixed(_SUCCESSOR, ev.seq)
    out.name("node", ev.node)


def _read_successor(reader: _Reader) -> Successor:
    (seq,) = reader.fixed(_SUCCESSOR)
    return Successor(seq=seq, node=reader.text("node"))


def _write_offload(ev: Offload, out: _Writer) -> None:
    out.fixed(_OFFLOAD, ev.ops)
    out.name("target", ev.target)
    out.text("reason", ev.reason)


def _read_offload(reader: _Reader) -> Offload:
    (ops,) = reader.fixed(_OFFLOAD)
    return Offload(ops=ops, target=reader.text("target"),
                   reason=reader.text("reason", MAX_REASON))


def _write_processed(ev: Processed, out: _Writer) -> None:
    out.fixed(_PROCESSED, ev.first_seq, ev.last_seq)
    out.name("target", ev.target)
    out.raw(ev.payload)


def _read_processed(reader: _Reader) -> Processed:
    first_seq, last_seq = reader.fixed(_PROCESSED)
    if not 1 <= first_seq <= last_seq:
        raise RemoteProtocolError(f"PROCESSED {first_seq}..{last_seq}: need 1 <= first_seq "
                                  "<= last_seq")
    target = reader.text("target")
    return Processed(target=target, first_seq=first_seq, last_seq=last_seq,
                     payload=bytes(reader.rest()))


def _write_mismatch(ev: Mismatch, out: _Writer) -> None:
    out.fixed(_MISMATCH, ev.seq, ev.offset, ev.length)
    out.name("volume", ev.volume)


def _read_mismatch(reader: _Reader) -> Mismatch:
    seq, offset, length = reader.fixed(_MISMATCH)
    return Mismatch(seq=seq, offset=offset, length=length, volume=reader.text("volume"))


def _write_report(ev: Report, out: _Writer) -> None:
    try:
        out.raw(json.dumps(ev.report, separators=(",", ":")).encode())
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"REPORT is not JSON: {exc}") from None


def _read_report(reader: _Reader) -> Report:
    try:
        report = json.loads(bytes(reader.rest()))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nested too deep
        raise RemoteProtocolError(f"REPORT is not JSON: {exc}") from None
    if not isinstance(report, dict):
        raise RemoteProtocolError(f"REPORT is a JSON {type(report).__name__}, not an object")
    return Report(report=report)


def _fixed_only(cls: type, part: _Fixed) -> _Codec:
    """The codec of a frame whose body is one fixed part, its fields named as the event's."""
    def write(ev, out: _Writer) -> None:
        out.fixed(part, *(getattr(ev, name) for name in part.names))

    def read(reader: _Reader) -> Frame:
        return cls(**dict(zip(part.names, reader.fixed(part))))
    return _Codec(write, read)


CODECS: dict[FrameType, _Codec] = {
    FrameType.HELLO: _Codec(_write_hello, _read_hello),
    FrameType.WELCOME: _Codec(_write_welcome, _read_welcome),
    FrameType.REFUSE: _code_and_text(Refuse, "reason"),
    FrameType.RECORDS: _Codec(_write_records, _read_records, compressible=True),
    FrameType.ACK: _fixed_only(Ack, _ACK),
    FrameType.HEARTBEAT: _fixed_only(Heartbeat, _HEARTBEAT),
    FrameType.ERROR: _code_and_text(Error, "message"),
    FrameType.RESYNC_DATA: _Codec(_write_resync_data, _read_resync_data),
    FrameType.RESYNC_DONE: _fixed_only(ResyncDone, _RESYNC_DONE),
    FrameType.RESYNC_ACK: _fixed_only(ResyncAck, _RESYNC_ACK),
    FrameType.HASH_REQUEST: _Codec(_write_hash_request, _read_hash_request),
    FrameType.HASH_REPLY: _Codec(_write_hash_reply, _read_hash_reply),
    FrameType.DIVERGED: _Codec(_write_diverged, _read_diverged),
    FrameType.HANDOVER: _Codec(_write_handover, _read_handover),
    FrameType.FETCH: _fixed_only(Fetch, _FETCH),
    FrameType.RETAIN: _fixed_only(Retain, _RETAIN),
    FrameType.RESYNC_BEGIN: _fixed_only(ResyncBegin, _RESYNC_BEGIN),
    FrameType.SUCCESSOR: _Codec(_write_successor, _read_successor),
    FrameType.FLUSH: _fixed_only(Flush, _FLUSH),
    FrameType.OFFLOAD: _Codec(_write_offload, _read_offload),
    FrameType.PROCESSED: _Codec(_write_processed, _read_processed),
    FrameType.MISMATCH: _Codec(_write_mismatch, _read_mismatch),
    FrameType.REPORT: _Codec(_write_report, _read_report),
}
assert set(CODECS) == set(FrameType), "every frame type needs a codec"


def encode_body(event: Frame, *, max_frame: int,
                compressor: zstandard.ZstdCompressor | None = None) -> tuple[int, list]:
    """(flags, body parts) of an event; the parts joined are the body on the wire.
    Records payloads are passed through uncopied (or compressed when event.compress and
    a compressor is given). Raises LocalProtocolError for anything not encodable."""
    if not isinstance(event, _FRAME_CLASSES):
        raise LocalProtocolError(f"{type(event).__name__} is not a frame")
    kind = event.frame_type
    out = _Writer(kind, max_frame, compressor)
    CODECS[kind].encode(event, out)
    body_length = sum(map(len, out.parts))
    if body_length > max_frame:
        what = (f"RECORDS {event.first_seq}..{event.last_seq}:" if isinstance(event, Records)
                else kind.name)
        raise LocalProtocolError(f"{what} body of {body_length} bytes exceeds "
                                 f"max_frame {max_frame}")
    return out.flags, out.parts


def decode_body(type_code: int, flags: int, body: memoryview, *, max_frame: int,
                decompressor: zstandard.ZstdDecompressor | None = None) -> Frame | None:
    """The event of one complete, checksum-verified frame body, or None for an ignorable
    frame (type >= 0x80). decompressor is None when zstd was not negotiated, and then a
    COMPRESSED frame is an error. The event never references `body`."""
    if type_code >= IGNORABLE_FROM:
        return None
    try:
        kind = FrameType(type_code)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame type 0x{type_code:02x}") from None
    if flags & ~FLAG_COMPRESSED:
        raise RemoteProtocolError(f"{kind.name} has unknown flags 0x{flags:02x}")
    codec = CODECS[kind]
    if flags and not codec.compressible:
        raise RemoteProtocolError(f"{kind.name} has flags 0x{flags:02x}: only RECORDS may be "
                                  "COMPRESSED")
    reader = _Reader(kind, body, flags, max_frame, decompressor)
    event = codec.decode(reader)
    reader.end()
    return event


def _write_history(out: _Writer, history) -> None:
    if len(history) > MAX_GENERATIONS:
        raise LocalProtocolError(f"{out.kind.name} history of {len(history)} generations "
                                 f"exceeds {MAX_GENERATIONS}")
    out.fixed(_HISTORY, len(history))
    for generation, first_seq in history:
        out.fixed(_GENERATION, generation, first_seq)


def _read_history(reader: _Reader) -> tuple:
    (count,) = reader.fixed(_HISTORY)
    if count > MAX_GENERATIONS:
        raise RemoteProtocolError(f"{reader.kind.name} history of {count} generations "
                                  f"exceeds {MAX_GENERATIONS}")
    return tuple(reader.fixed(_GENERATION) for _ in range(count))


def _check_hash_request(event: HashRequest, error: type[ProtocolError]) -> None:
    if event.length <= 0 or event.granularity <= 0:
        raise error(f"HASH_REQUEST length {event.length} and granularity "
                    f"{event.granularity} must be positive")
    if event.regions > MAX_HASH_REGIONS:
        raise error(f"HASH_REQUEST for {event.regions} regions exceeds {MAX_HASH_REGIONS}")


_SIZE_UNKNOWN = -1  # frame_content_size() of a frame that does not declare its size


def _inflate(wire: memoryview, raw_length: int, decompressor: zstandard.ZstdDecompressor) -> bytes:
    """Exactly one zstd frame inflating to exactly raw_length bytes. Never produces more
    than raw_length bytes, whatever the frame claims (no decompression bombs)."""
    try:
        declared = zstandard.frame_content_size(wire)
    except zstandard.ZstdError:
        raise RemoteProtocolError(
            "RECORDS payload does not start with a zstd frame header") from None
    if declared not in (_SIZE_UNKNOWN, raw_length):
        raise RemoteProtocolError(f"RECORDS zstd frame declares {declared} bytes but "
                                  f"raw_length is {raw_length}")
    try:
        if raw_length == 0:
            # The one-shot API returns b"" for an empty declared frame without reading
            # it; stream it instead (libzstd enforces the declared size of 0).
            if declared != 0:
                raise RemoteProtocolError("RECORDS raw_length is 0 but the zstd frame does "
                                          "not declare its size")
            inflater = decompressor.decompressobj()
            payload = inflater.decompress(wire)
            if not inflater.eof or inflater.unused_data:
                raise RemoteProtocolError("RECORDS payload is not exactly one zstd frame")
        else:
            # Output is allocated at raw_length (<= max_frame) and may not grow past it.
            payload = decompressor.decompress(wire, max_output_size=raw_length,
                                              allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"RECORDS payload does not inflate to raw_length "
                                  f"{raw_length}: {exc}") from None
    if len(payload) != raw_length:
        raise RemoteProtocolError(f"RECORDS payload inflates to {len(payload)} bytes but "
                                  f"raw_length is {raw_length}")
    return payload
