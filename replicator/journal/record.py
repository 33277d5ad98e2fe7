"""Journal record: the unit of replication, byte for byte the same in every journal
and on the wire, so its checksums hold end to end (DESIGN.md invariant 3).

Byte layout (little-endian), header then the volume name then the payload:

    off  size  field
    0    4     magic      b"RJR1"
    4    4     hcrc       CRC32C of bytes 8 .. end of name (covers pcrc too)
    8    8     seq        group sequence number, gap-free, strictly increasing
    16   8     offset     byte offset in the volume
    24   4     length     bytes affected in the volume
    28   4     pcrc       CRC32C of the payload (0 when there is none)
    32   8     time_ns    wall clock when the primary journaled the write (for lag)
    40   1     kind       Kind.WRITE carries `length` payload bytes; ZERO, SKIP, MARKER none
    41   1     name_len   bytes of volume name that follow the header (1..255)
    42   2     flags      FLAG_OPEN or 0 (every other bit must be 0)
    44   n     name       volume name, UTF-8
    44+n m     payload    m = length for WRITE, 0 for ZERO

A WRITE's `length` is checked against MAX_LENGTH before anything is read, so a damaged
length never triggers a huge read. A ZERO carries no payload, so its length may be any
u32 (a whole-device discard is one record). Decoding is strict: an unknown kind or flag,
a SKIP with a length or an empty name is corruption, like a checksum mismatch.

A MARKER is a named point in the journal (`replicator mark`): its name field holds the
marker's name (not a volume's), its length is 0 and its offset 1 when it was taken
between freeze and thaw hooks (application-consistent), else 0. It changes nothing, so
it applies like a SKIP, and it closes its epoch: the image after it is the marker's.

Epochs (DESIGN.md): a record with FLAG_OPEN is inside an epoch that goes on after it, so
the image after it is not one any node may show; the epoch's last record has no flag.
An NBD write is its own epoch (flags 0): every seq whose record lacks FLAG_OPEN is a
consistent point. A watched file's changed blocks are journaled as one epoch, and a
periodic link sends (a, k] coalesced: a record every byte of which later records of
the epoch write again goes as a SKIP, which keeps its seq and changes nothing.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from crc32c import crc32c

MAGIC = b"RJR1"
_FIELDS = "QQIIQBBH"  # seq .. flags: the checksummed header fields
HEADER = struct.Struct("<4sI" + _FIELDS)
HEADER_SIZE = HEADER.size  # 44
MAX_LENGTH = 64 * 1024 * 1024  # largest payload of one WRITE record
_HCRC_AT = 4
_CRC_FROM = 8
_PREFIX = struct.Struct("<4sI")  # magic, hcrc: what precedes the checksummed part
_BODIES: dict[int, struct.Struct] = {}  # by volume name length


class Kind(enum.IntEnum):
    WRITE = 1
    ZERO = 2  # NBD TRIM and WRITE_ZEROES: the range reads back as zeroes
    SKIP = 3  # holds its seq, changes nothing (coalesced away by a periodic link)
    MARKER = 4  # a named point: changes nothing; name = the marker's (see above)


CHANGING = frozenset((Kind.WRITE, Kind.ZERO))  # the kinds that change a volume
FLAG_OPEN = 1  # the record's epoch goes on after it: the image after it is not consistent


class RecordError(Exception):
    """A record that cannot be decoded. `torn` is True when the bytes simply end early
    (the tail of a log that was being written), False when they are corrupt."""

    def __init__(self, message: str, *, torn: bool):
        super().__init__(message)
        self.torn = torn


class Record(NamedTuple):
    """A decoded record (a tuple: built once per record on every replica's hot path)."""
    seq: int
    volume: str
    offset: int
    length: int
    kind: Kind
    time_ns: int
    hcrc: int
    payload: memoryview | bytes  # empty for ZERO and SKIP
    size: int  # encoded size in bytes
    flags: int = 0


def encode_header(seq: int, volume_name: bytes, offset: int, length: int, kind: Kind,
                  time_ns: int, payload, flags: int = 0) -> bytes:
    """Header and name of a record whose payload (for WRITE) follows separately, so a
    writer can hand header and payload to one writev without copying the payload."""
    if not 0 < len(volume_name) < 256:
        raise ValueError(f"volume name must be 1..255 bytes, got {len(volume_name)}")
    if kind == Kind.WRITE and length > MAX_LENGTH:
        raise ValueError(f"write length {length} exceeds {MAX_LENGTH}")
    pcrc = crc32c(payload) if kind == Kind.WRITE else 0
    body = _BODIES.get(len(volume_name))
    if body is None:  # the checksummed part: header fields from seq on, then the name
        body = _BODIES[len(volume_name)] = struct.Struct(
            f"<{_FIELDS}{len(volume_name)}s")
    rest = body.pack(seq, offset, length, pcrc, time_ns, kind, len(volume_name), flags,
                     volume_name)
    return _PREFIX.pack(MAGIC, crc32c(rest)) + rest


def header_crc(header: bytes | bytearray) -> int:
    return struct.unpack_from("<I", header, _HCRC_AT)[0]


_KINDS = {int(k): k for k in Kind}
_names: dict[bytes, str] = {}  # volume names seen, decoded once (a group has a few)


def _volume_name(raw: bytes, seq: int) -> str:
    name = _names.get(raw)
    if name is None:
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise RecordError(f"volume name is not UTF-8 (seq {seq})", torn=False) from None
        if len(_names) < 4096:
            _names[raw] = name
    return name


def _head(view: memoryview, pos: int) -> tuple:
    """The checked header fields and volume name of the record at `pos`, and where its
    name ends. Raises RecordError."""
    end_of_buf = len(view)
    if end_of_buf - pos < HEADER_SIZE:
        raise RecordError(f"{end_of_buf - pos} bytes left, header needs {HEADER_SIZE}",
                          torn=True)
    magic, hcrc, seq, offset, length, pcrc, time_ns, kind, name_len, flags = \
        HEADER.unpack_from(view, pos)
    if magic != MAGIC:
        raise RecordError(f"bad magic {bytes(magic)!r}", torn=False)
    if kind == Kind.WRITE and length > MAX_LENGTH:
        raise RecordError(f"length {length} exceeds {MAX_LENGTH}", torn=False)
    name_end = pos + HEADER_SIZE + name_len
    if name_end > end_of_buf:
        raise RecordError("record name cut short", torn=True)
    if crc32c(view[pos + _CRC_FROM:name_end]) != hcrc:
        raise RecordError(f"header checksum mismatch at seq field {seq}", torn=False)
    known = _KINDS.get(kind)
    if flags & ~FLAG_OPEN or name_len == 0 or known is None or \
            known is Kind.SKIP and length or \
            known is Kind.MARKER and (length or offset > 1 or flags):
        raise RecordError(f"invalid header fields (kind {kind}, length {length}, name_len "
                          f"{name_len}, flags {flags:#x})", torn=False)
    volume = _volume_name(bytes(view[pos + HEADER_SIZE:name_end]), seq)
    return seq, volume, offset, length, known, time_ns, hcrc, pcrc, flags, name_end


def decode(buf, pos: int = 0) -> Record:
    """Decode the record at `pos` of `buf` (bytes-like). Raises RecordError."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    seq, volume, offset, length, kind, time_ns, hcrc, pcrc, flags, name_end = _head(view, pos)
    end = name_end + length if kind is Kind.WRITE else name_end
    if end > len(view):
        raise RecordError(f"payload cut short (seq {seq})", torn=True)
    payload = view[name_end:end]
    if end != name_end and crc32c(payload) != pcrc:
        raise RecordError(f"payload checksum mismatch (seq {seq})", torn=False)
    return Record(seq, volume, offset, length, kind, time_ns, hcrc, payload, end - pos, flags)


def decode_head(buf, pos: int = 0) -> tuple[Record, int]:
    """The record at `pos` of `buf` without its payload, checked as far as its header
    and name go, and the payload checksum its header names: for a processed record
    (offload/codec.py), whose payload follows in another form. The Record's payload is
    empty and its size that of the header and name. Raises RecordError."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    seq, volume, offset, length, kind, time_ns, hcrc, pcrc, flags, name_end = _head(view, pos)
    return Record(seq, volume, offset, length, kind, time_ns, hcrc, b"", name_end - pos,
                  flags), pcrc


def rewritten(rec: Record, flags: int, *, skip: bool = False) -> list:
    """The encoded bytes of `rec` (header and name, then its payload) with `flags`, or,
    with `skip`, a SKIP record of the same seq, volume and time."""
    name = rec.volume.encode()
    if skip:
        return [encode_header(rec.seq, name, 0, 0, Kind.SKIP, rec.time_ns, b"", flags)]
    hdr = encode_header(rec.seq, name, rec.offset, rec.length, rec.kind, rec.time_ns,
                        rec.payload, flags)
    return [hdr, rec.payload] if rec.kind is Kind.WRITE else [hdr]


def trusted_extent(buf, pos: int = 0) -> int:
    """Where the record at `pos` ends as far as its header can be trusted (for a record
    that failed decode): the whole record if the header's checksum holds, else only the
    header and the name it claims. Never past the end of `buf`."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    if len(view) - pos < HEADER_SIZE:
        return len(view)
    _, hcrc, _, _, length, _, _, kind, name_len, _ = HEADER.unpack_from(view, pos)
    end = pos + HEADER_SIZE + name_len
    if end <= len(view) and crc32c(view[pos + _CRC_FROM:end]) == hcrc \
            and kind == Kind.WRITE and length <= MAX_LENGTH:
        end += length
    return min(end, len(view))


def iterate(buf, pos: int = 0):
    """Yield the records of a contiguous run of encoded records."""
    end = len(buf)
    while pos < end:
        rec = decode(buf, pos)
        yield rec
        pos += rec.size
