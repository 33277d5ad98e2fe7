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
from replicator.undo import UndoError, UndoLog


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
], ids=["name-not-utf8", "entry-cut-short", "bits-past-the-end", "trailing-bytes"])
def test_fuzz_regression_a_bitmap_whose_checksum_holds_but_lies_is_refused(tmp_path, volumes,
                                                                            nvol):
    path = tmp_path / "t.bm"
    path.write_bytes(_bitmap_file(volumes, nvol))
    with pytest.raises(BitmapError, match="damaged"):
        Bitmap(str(path), {"data": 1 << 20}, 4096).load()


@pytest.mark.parametrize("last", [False, True], ids=["inside", "last-entry"])
def test_fuzz_regression_an_undo_entry_whose_name_is_not_utf8_is_damaged(tmp_path, last):
    """target undo: an entry's CRC covers only its old data, so a volume name of bytes
    c0 61 74 61 with a good CRC raised UnicodeDecodeError out of UndoLog.open."""
    def entry(name: bytes, offset: int) -> bytes:
        old = b"old data"
        return struct.pack("<4sHQII", b"RUN1", len(name), offset, len(old), crc32c(old)) \
            + name + old
    good, bad = entry(b"data", 0), entry(b"\xc0ata", 4096)
    path = tmp_path / "resync.undo"
    path.write_bytes(good + bad if last else bad + good)
    log = UndoLog(str(path))
    with pytest.raises(UndoError, match="damaged entry at offset"):
        log.open()
    log.close()
