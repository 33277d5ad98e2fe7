"""The processed form of a record (seed 000): what a near secondary makes of a write for
a far target, from the write and the content it overwrites (the *base*), and how the
far target turns it back into the record, byte for byte.

A processed run (the payload of a PROCESSED frame) is, per record, in seq order:

    head      the record's header and volume name exactly as journaled (its header CRC
              and the CRC of the original payload stay in it: the record is rebuilt and
              checked end to end, DESIGN.md invariant 3)
    ZERO and SKIP records end there (they have no payload); a WRITE goes on:
    ops       u8   what was done, in this order: DELTA (payload XOR base), ZSTD (one
                   zstd frame; of the delta, or of the payload with the base as its
                   dictionary), ENCRYPT (ChaCha20-Poly1305, the far link's key, the head
                   as associated data, body = 12-byte nonce + ciphertext + tag);
                   CHECKSUM: `base` is set
    base      u64  XXH3-64 of the base (0 without CHECKSUM)
    size      u32  bytes of body that follow
    body      the payload in that form

A step that would not shrink the payload (zstd of random bytes, of a first write) is
left out for that record, and its bit says so. The far side checks the base before
anything else: a base that differs is a BaseMismatch (the two replicas do not hold the
same image there; never applied, the region is resynced); a body that does not decrypt,
inflate or match the original payload's CRC is a ProcessedError (corruption).
"""

from __future__ import annotations

import enum
import os
import struct

import zstandard
from crc32c import crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from xxhash import xxh3_64_intdigest

from ..journal.record import MAX_LENGTH, Kind, Record, RecordError, decode, decode_head

ZSTD_LEVEL = 3  # off the primary's write path: a near node can afford more than level 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_ITEM = struct.Struct("<BQI")  # ops, base checksum, body size
MAX_BODY = MAX_LENGTH + 1024  # a WRITE's body: never past its payload and some framing
_SIZE_UNKNOWN = -1  # zstandard.frame_content_size() of a frame that does not declare it


class Op(enum.IntFlag):
    DELTA = 1
    ZSTD = 2
    CHECKSUM = 4
    ENCRYPT = 8


OPS = {"delta": Op.DELTA, "zstd": Op.ZSTD, "checksum": Op.CHECKSUM, "encrypt": Op.ENCRYPT}
# the bits as plain ints, for the per-record paths (IntFlag arithmetic costs microseconds)
_DELTA, _ZSTD, _CHECKSUM, _ENCRYPT = (int(op) for op in Op)
_ALL = _DELTA | _ZSTD | _CHECKSUM | _ENCRYPT


def ops_of(names) -> Op:
    """The Op flags of configured names (config.py validates them)."""
    ops = Op(0)
    for name in names:
        ops |= OPS[name]
    return ops


def ops_names(ops: int) -> list[str]:
    return [name for name, op in OPS.items() if ops & op]


class ProcessedError(Exception):
    """A processed run that cannot be turned back into its records (corrupt)."""


class BaseMismatch(Exception):
    """The far replica's content under a processed write is not the base it was
    processed against: the replicas differ there."""

    def __init__(self, rec: Record):
        super().__init__(f"seq {rec.seq}: the content of {rec.volume} [{rec.offset}, "
                         f"+{rec.length}) here is not the base the write was processed "
                         "against")
        self.record = rec


def load_key(path: str) -> bytes:
    """A link key file: 64 hex digits (32 bytes), whitespace around them allowed."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read link key {path}: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise ValueError(f"link key {path} must hold {2 * KEY_SIZE} hex digits "
                         f"({KEY_SIZE} bytes)")
    return key


def _xor(a, b) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def _dictionary(base: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


class Processor:
    """Makes processed records for one far target: `ops`, and the link key when they
    include ENCRYPT."""

    def __init__(self, ops: Op, key: bytes | None = None):
        if ops & Op.ENCRYPT and key is None:
            raise ValueError("encrypt needs the far link's key")
        self.ops = ops
        self._ops = int(ops)
        self._aead = ChaCha20Poly1305(key) if ops & Op.ENCRYPT else None
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def process(self, head, rec: Record, base: bytes | None) -> list:
        """The processed form of `rec` (whose header and name are `head`) as a list of
        buffers; `base`: the content it overwrites (None for ZERO and SKIP)."""
        if rec.kind is not Kind.WRITE:
            return [head]
        ops, body = self._ops, rec.payload
        done = ops & _CHECKSUM
        if ops & _DELTA:
            body = _xor(body, base)
            done |= _DELTA
        if ops & _ZSTD and len(body) >= 64:
            zstd = self._zstd if done & _DELTA else zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, dict_data=_dictionary(base))
            packed = zstd.compress(body)
            if len(packed) < len(body):
                body, done = packed, done | _ZSTD
        if ops & _ENCRYPT:
            nonce = os.urandom(NONCE_SIZE)
            body = nonce + self._aead.encrypt(nonce, bytes(body), bytes(head))
            done |= _ENCRYPT
        check = xxh3_64_intdigest(base) if ops & _CHECKSUM else 0
        return [head, _ITEM.pack(done, check, len(body)), body]


class Restorer:
    """Turns a far target's processed records back into records; `key`: the link key,
    needed only for encrypted ones."""

    def __init__(self, key: bytes | None = None):
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self._unzstd = zstandard.ZstdDecompressor()

    def restore(self, buf, pos: int, base_of) -> tuple[Record, list, int]:
        """The record at `pos` of the processed run `buf`: (record, its journal bytes as
        buffers, where the next one starts). `base_of(record)` reads the content the
        write overwrites. Raises ProcessedError or BaseMismatch."""
        view = buf if type(buf) is memoryview else memoryview(buf)
        try:
            rec, pcrc = decode_head(view, pos)
        except RecordError as exc:
            raise ProcessedError(f"processed record at byte {pos}: {exc}") from None
        head = view[pos:pos + rec.size]
        at = pos + rec.size
        if rec.kind is not Kind.WRITE:
            return rec, [head], at
        if len(view) - at < _ITEM.size:
            raise ProcessedError(f"seq {rec.seq}: processed record cut short")
        ops, check, size = _ITEM.unpack_from(view, at)
        at += _ITEM.size
        if ops & ~_ALL or size > MAX_BODY or len(view) - at < size:
            raise ProcessedError(f"seq {rec.seq}: processed record with ops {ops:#x} and a "
                                 f"body of {size} bytes ({len(view) - at} left)")
        body = view[at:at + size]
        base = base_of(rec)
        if ops & _CHECKSUM and xxh3_64_intdigest(base) != check:
            raise BaseMismatch(rec)
        payload = self._unprocess(rec, ops, head, body, base)
        if crc32c(payload) != pcrc:
            if ops & (_DELTA | _ZSTD) and not ops & _CHECKSUM:
                raise BaseMismatch(rec)  # most likely: nothing else says which it was
            raise ProcessedError(f"seq {rec.seq}: the restored payload does not match the "
                                 "record's checksum")
        return rec._replace(payload=payload, size=rec.size + rec.length), [head, payload], \
            at + size

    def _unprocess(self, rec: Record, ops: int, head, body, base) -> bytes:
        if ops & _ENCRYPT:
            if self._aead is None:
                raise ProcessedError(f"seq {rec.seq} is encrypted and this node has no key "
                                     "for the link")
            if len(body) < NONCE_SIZE + TAG_SIZE:
                raise ProcessedError(f"seq {rec.seq}: encrypted body of {len(body)} bytes")
            try:
                body = self._aead.decrypt(bytes(body[:NONCE_SIZE]), bytes(body[NONCE_SIZE:]),
                                          bytes(head))
            except InvalidTag:
                raise ProcessedError(f"seq {rec.seq} does not decrypt with this node's key "
                                     "for the link (another key, or damaged)") from None
        if ops & _ZSTD:
            # The one-shot API allocates what the frame declares, whatever
            # max_output_size says: a damaged size must not become a huge allocation.
            try:
                declared = zstandard.frame_content_size(body)
            except zstandard.ZstdError:
                raise ProcessedError(f"seq {rec.seq}: body is not a zstd frame") from None
            if declared not in (_SIZE_UNKNOWN, rec.length):
                raise ProcessedError(f"seq {rec.seq}: zstd body declares {declared} bytes "
                                     f"for a write of {rec.length}")
            unzstd = self._unzstd if ops & _DELTA else zstandard.ZstdDecompressor(
                dict_data=_dictionary(base))
            try:
                body = unzstd.decompress(body, max_output_size=rec.length,
                                         allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise ProcessedError(f"seq {rec.seq}: body does not inflate: {exc}") from None
        if len(body) != rec.length:
            raise ProcessedError(f"seq {rec.seq}: body of {len(body)} bytes for a write of "
                                 f"{rec.length}")
        return _xor(body, base) if ops & _DELTA else bytes(body)


def raw_run(buf) -> list[tuple[Record, object]]:
    """The records of a RECORDS payload and the header bytes of each (for processing)."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    out, pos = [], 0
    while pos < len(view):
        rec = decode(view, pos)
        head_size = rec.size - (rec.length if rec.kind is Kind.WRITE else 0)
        out.append((rec, view[pos:pos + head_size]))
        pos += rec.size
    return out
