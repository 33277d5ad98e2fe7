"""Real NBD clients (libnbd's nbdinfo and nbdcopy, qemu-io, qemu-img, fio's nbd engine)
against the NBD server with file-backed exports; every result is checked against the
backing file itself."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess

import pytest

from tests.nbd_fixtures import MiB, FileExport, nbd_server  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a client to completion (subprocess.run kills it on timeout)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    cmd = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        cmd += ["-c", c]
    out = run(cmd + [uri]).stdout
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def backing(export: FileExport, offset: int, length: int) -> bytes:
    with open(export.path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def srv(nbd_server):
    return nbd_server()


def test_nbdinfo_reports_size_and_capabilities(srv):
    info = json.loads(run(["nbdinfo", "--json", srv.uri("data")]).stdout)
    (export,) = info["exports"]
    assert export["export-name"] == "data"
    assert export["export-size"] == 8 * MiB and export["is_read_only"] is False
    for capability in ("can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"):
        assert export[capability] is True, capability
    assert export["block_size_minimum"] == 1 and export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    (ro,) = json.loads(run(["nbdinfo", "--json", srv.uri("ro")]).stdout)["exports"]
    assert ro["export-size"] == MiB and ro["is_read_only"] is True


def test_nbdinfo_lists_the_exports(srv):
    out = run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{srv.port}"]).stdout
    names = sorted(e["export-name"] for e in json.loads(out)["exports"])
    assert names == ["data", "ro"]


def test_unknown_or_missing_export_name_is_refused_with_the_valid_names(srv):
    assert run(["nbdinfo", srv.uri("nope")], check=False).returncode != 0
    for uri, why in ((srv.uri("nope"), "no export named 'nope'"),
                     (f"nbd://127.0.0.1:{srv.port}", "an export name is required")):
        p = run(["qemu-io", "-f", "raw", "-c", "read 0 1", uri], check=False)
        assert p.returncode != 0
        assert f"server reported: {why}; exports: data, ro" in p.stderr, p.stderr


def test_qemu_io_patterns_reach_the_backing_file(srv):
    export = srv.exports["data"]
    uri = srv.uri("data")
    qemu_io(uri, "write -P 0xab 0 64k", "write -P 0xcd -f 1M 4k", "flush")  # -f: FUA
    qemu_io(uri, "read -P 0xab 0 64k", "read -P 0xcd 1M 4k", "read -P 0 64k 4k")
    assert backing(export, 0, 64 * 1024) == b"\xab" * 64 * 1024
    assert backing(export, MiB, 4096) == b"\xcd" * 4096
    assert export.fua_writes >= 1
    qemu_io(uri, "write -z 4k 8k", "discard 32k 4k", "write -P 0x11 7M 1024", "write -P 0x22 7341056 512")
    qemu_io(uri, "read -P 0 4k 8k", "read -P 0 32k 4k", "read -P 0xab 12k 20k",
            "read -P 0x11 7M 1024", "read -P 0x22 7341056 512")
    expected = bytearray(b"\xab" * 64 * 1024)
    expected[4096:12288] = bytes(8192)
    expected[32768:36864] = bytes(4096)
    assert backing(export, 0, 64 * 1024) == expected
    assert backing(export, 7 * MiB, 1536) == b"\x11" * 1024 + b"\x22" * 512


def test_qemu_io_cannot_write_a_read_only_export(srv):
    export = srv.exports["ro"]
    p = run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4k", srv.uri("ro")], check=False)
    assert p.returncode != 0 or "fail" in (p.stdout + p.stderr).lower(), p
    assert backing(export, 0, 4096) == b"\x5a" * 4096
    qemu_io(srv.uri("ro"), "read -P 0x5a 0 1M", read_only=True)


def test_qemu_img_convert_into_the_export(srv, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri("data")])
    assert filecmp.cmp(src, srv.exports["data"].path, shallow=False)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri("data")])


def test_nbdcopy_both_directions(srv, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    run(["nbdcopy", str(src), srv.uri("data")])  # multi-conn: several connections
    assert filecmp.cmp(src, srv.exports["data"].path, shallow=False)
    out = tmp_path / "out.img"
    run(["nbdcopy", srv.uri("data"), str(out)])
    assert filecmp.cmp(src, out, shallow=False)
    run(["cmp", str(src), str(out)])


def test_fio_random_writes_verify(srv, tmp_path):
    out = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri('data')}",
               "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M",
               "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
               "--verify_state_save=0", f"--directory={tmp_path}", "--output-format=json"],
              timeout=120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == 2048  # every 4 KiB block of 8 MiB, once
    assert job["read"]["total_ios"] == 2048   # ...and read back and verified
