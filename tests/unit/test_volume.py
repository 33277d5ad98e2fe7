"""Volume: hashing through a temporary mapping, forgetting what a bulk pass read, and\nhow an image file's blocks are allocated."""

from __future__ import annotations

import os
import subprocess

import pytest

from replicator.verify import region_hashes, volume_hashes
from replicator.volume import Volume, VolumeError
from tests.agents import small_fs


def _resident_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_what_a_pass_read_leaves_the_cache_and_mappings_are_let_go(tmp_path):
    vol = Volume("data", str(tmp_path / "data.img"), 8 << 20)
    vol.open()
    try:
        vol.write(5 << 20, b"x" * 4096)
        vol.sync()
        vol.forget()
        for off in range(0, vol.size, 64 << 10):  # what a resync pass reads
            vol.read(off, 64 << 10)
        assert _resident_bytes(vol.path) >= 4 << 20
        vol.forget()
        assert _resident_bytes(vol.path) == 0
        hashes = volume_hashes(vol, 4 << 20, 4 << 20, 64 << 10)  # what verify hashes
        assert hashes == region_hashes(vol.read(4 << 20, 4 << 20), 64 << 10)
        assert _resident_bytes(vol.path) > 0
        vol.forget()
        assert _resident_bytes(vol.path) == 0
        assert volume_hashes(vol, 0, 0, 64 << 10) == b""
    finally:
        vol.close()  # raises if a mapping of it were still alive


def test_a_preallocated_image_has_every_block_and_keeps_them_when_zeroed(tmp_path):
    with small_fs(tmp_path / "fs", "4m") as mnt:
        vol = Volume("data", os.path.join(mnt, "data.img"), 2 << 20, "preallocate")
        vol.open()
        try:
            assert os.fstat(vol.fd).st_blocks * 512 >= vol.size
            vol.write(0, b"x" * 65536)
            vol.zero(0, 1 << 20)  # a TRIM must not give the blocks back
            assert os.fstat(vol.fd).st_blocks * 512 >= vol.size
            assert vol.read(0, 65536) == bytes(65536)
            with open(os.path.join(mnt, "filler"), "wb") as f:  # fill the rest
                try:
                    while True:
                        f.write(b"f" * 65536)
                        f.flush()
                except OSError:
                    pass
            vol.write(1 << 20, b"y" * (1 << 20))  # still fits: the blocks are its own
        finally:
            vol.close()


@pytest.mark.parametrize("allocation", ["preallocate", "check"])
def test_an_image_that_cannot_fit_its_file_system_is_refused_at_open(tmp_path, allocation):
    with small_fs(tmp_path / "fs", "1m") as mnt:
        vol = Volume("data", os.path.join(mnt, "data.img"), 4 << 20, allocation)
        with pytest.raises(VolumeError, match="allocat"):
            vol.open()
        assert vol.fd == -1
        sparse = Volume("data", os.path.join(mnt, "data.img"), 4 << 20, "sparse")
        sparse.open()  # the operator chose to run out of space at write time
        sparse.close()
