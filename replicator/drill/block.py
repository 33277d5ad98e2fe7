"""Workload blocks for the DR drill: every block says which write produced it.

A block of `block_size` bytes (a multiple of 512):

    offset  size
    0       8    MAGIC b"RDRILL01"
    8       16   run id (random per writer run)
    24      8    write index (position in the run's order)
    32      8    byte offset of the block in the volume
    40      4    block size
    44      4    CRC-32 of the whole block except these 4 bytes
    48      ..   filler: the SHAKE-128 stream of (run id, index)
    (integers big endian)

A block read back from an image is therefore either exactly what one write produced or
recognisably not: `decode` tells which write of which run a block holds (None for
zeros, torn or foreign data) without a ledger. The ledger keeps a BLAKE2b-128 digest
of the whole block (`digest`), so checking a write is one read and one hash.

`Order` maps write index i to a block number: a permutation of the volume's blocks, so
every block is written at most once per run and its latest content is known. The
shuffled order is the affine permutation i -> (a*i + b) mod n with a coprime to n,
drawn from a seeded RNG: it scatters writes over the volume in O(1) memory, and the
ledger records (n, a, b) so a checker recomputes any write's offset without the RNG.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

MAGIC = b"RDRILL01"
HEADER = struct.Struct(">8s16sQQII")
_CRC_AT = 44  # offset of the CRC field; HEADER.size == 48
SECTOR = 512


class BlockId(NamedTuple):
    run_id: bytes
    index: int
    offset: int


def check_block_size(block_size: int) -> None:
    if block_size < SECTOR or block_size % SECTOR:
        raise ValueError(f"block size {block_size} is not a positive multiple of {SECTOR}")


def encode(run_id: bytes, index: int, offset: int, block_size: int) -> bytes:
    """The content write `index` of run `run_id` puts at byte `offset`."""
    check_block_size(block_size)
    if len(run_id) != 16:
        raise ValueError("run id must be 16 bytes")
    filler = hashlib.shake_128(run_id + index.to_bytes(8, "big")).digest(block_size - HEADER.size)
    head = HEADER.pack(MAGIC, run_id, index, offset, block_size, 0)[:_CRC_AT]
    crc = zlib.crc32(filler, zlib.crc32(head))
    return head + crc.to_bytes(4, "big") + filler


def decode(data: bytes) -> BlockId | None:
    """Which write produced `data`, or None if it is not an intact drill block."""
    if len(data) < SECTOR or data[:len(MAGIC)] != MAGIC:
        return None
    _, run_id, index, offset, block_size, crc = HEADER.unpack_from(data)
    if block_size != len(data) or zlib.crc32(data[HEADER.size:], zlib.crc32(data[:_CRC_AT])) != crc:
        return None
    return BlockId(run_id, index, offset)


def digest(data: bytes) -> str:
    """The ledger's hash of a block: BLAKE2b-128 of all its bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Order:
    """Write i goes to block (a*i + b) mod nblocks; a is coprime to nblocks."""
    nblocks: int
    a: int = 1
    b: int = 0

    def __post_init__(self):
        if self.nblocks < 1:
            raise ValueError("the volume holds no block")
        if not 0 < self.a < max(self.nblocks, 2) or math.gcd(self.a, self.nblocks) != 1:
            raise ValueError(f"multiplier {self.a} is not coprime to {self.nblocks}")
        if not 0 <= self.b < self.nblocks:
            raise ValueError(f"shift {self.b} is outside 0..{self.nblocks - 1}")

    @classmethod
    def sequential(cls, nblocks: int) -> "Order":
        return cls(nblocks)

    @classmethod
    def shuffled(cls, nblocks: int, seed: int) -> "Order":
        rng = random.Random(seed)
        a = 1
        if nblocks > 2:
            a = rng.randrange(2, nblocks)
            while math.gcd(a, nblocks) != 1:
                a = rng.randrange(2, nblocks)
        return cls(nblocks, a, rng.randrange(nblocks))

    def block(self, index: int) -> int:
        if not 0 <= index < self.nblocks:
            raise IndexError(f"write {index} is beyond the {self.nblocks} blocks of the volume")
        return (self.a * index + self.b) % self.nblocks
