"""Region hashes: how a node fingerprints its volumes, for online verify (compare a
target's regions with ours) and checksum resync (send only the regions that differ).

A region is one bitmap granule (`bitmap_granularity`, 64 KiB by default; the last one
of a volume may be shorter). Its hash is 8 bytes: the CRC32C and the CRC-32 (ISO-HDLC
polynomial) of its bytes, two independent 32-bit checks that both run at several GB/s
here, so hashing is never slower than reading. Like DRBD's `verify-alg crc32c`, this
detects corruption and divergence; it is not meant to resist a forger.

Each side hashes its own copy (the target computes its hashes and returns them; the
sender compares), so verifying moves no volume data over the link.
"""

from __future__ import annotations

import struct
import zlib

from crc32c import crc32c

HASH = struct.Struct("<II")
CHUNK = 4 << 20  # bytes of a volume covered by one HASH_REQUEST


def region_hashes(data, granularity: int) -> bytes:
    """The hashes of consecutive `granularity`-sized regions of `data`, concatenated."""
    view = memoryview(data)
    out = bytearray()
    for start in range(0, len(view), granularity):
        region = view[start:start + granularity]
        out += HASH.pack(crc32c(region), zlib.crc32(region))
    return bytes(out)


def volume_hashes(volume, offset: int, length: int, granularity: int) -> bytes:
    """region_hashes of [offset, offset + length) of a Volume, read from the page cache."""
    with volume.mapped(offset, length) as view:
        return region_hashes(view, granularity)


def differing(ours: bytes, theirs: bytes) -> list[int]:
    """Indexes of the regions whose hashes differ (all of them past a short answer)."""
    n = len(ours) // HASH.size
    return [i for i in range(n)
            if ours[i * HASH.size:(i + 1) * HASH.size] != theirs[i * HASH.size:(i + 1) * HASH.size]]


def chunks(volume_size: int, granularity: int, offset: int = 0, length: int | None = None):
    """(offset, length) pieces of at most CHUNK bytes covering the regions that overlap
    [offset, offset + length) of a volume, aligned to the granularity."""
    end = volume_size if length is None else min(volume_size, offset + length)
    pos = offset - offset % granularity
    step = max(granularity, CHUNK - CHUNK % granularity)
    while pos < end:
        piece = min(step, volume_size - pos, -(-(end - pos) // granularity) * granularity)
        yield pos, piece
        pos += piece
