"""Volume: hashing through a temporary mapping, and forgetting what a bulk pass read."""

from __future__ import annotations

import subprocess

from replicator.verify import region_hashes, volume_hashes
from replicator.volume import Volume


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
