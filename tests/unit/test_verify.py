"""Region hashes (replicator/verify.py): one xxh3-128 per region, taken in place."""

from __future__ import annotations

import random

import xxhash

from replicator.verify import differing, region_hashes
from replicator.wire import HASH_SIZE

GRAN = 4096


def test_one_xxh3_128_per_region_the_last_one_short():
    data = random.Random(1).randbytes(5 * GRAN + 123)
    hashes = region_hashes(data, GRAN)
    assert len(hashes) == 6 * HASH_SIZE == 6 * 16
    for i, start in enumerate(range(0, len(data), GRAN)):
        assert hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE] == \
            xxhash.xxh3_128(data[start:start + GRAN]).digest()
    assert region_hashes(memoryview(data), GRAN) == region_hashes(bytearray(data), GRAN) == hashes
    assert region_hashes(b"", GRAN) == b""


def test_differing_finds_exactly_the_changed_regions():
    rng = random.Random(2)
    ours = bytearray(rng.randbytes(64 * GRAN))
    theirs = bytearray(ours)
    changed = sorted(rng.sample(range(64), 7))
    for r in changed:
        theirs[r * GRAN + rng.randrange(GRAN)] ^= 1 << rng.randrange(8)  # one bit each
    assert differing(region_hashes(ours, GRAN), region_hashes(theirs, GRAN)) == changed
    assert differing(region_hashes(ours, GRAN), region_hashes(ours, GRAN)) == []
    # a short answer: every region it does not cover counts as differing
    short = region_hashes(ours, GRAN)[:10 * HASH_SIZE]
    assert differing(region_hashes(ours, GRAN), short) == list(range(10, 64))

