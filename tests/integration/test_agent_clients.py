"""Real NBD clients against the agent (the product path: NBD -> group -> journal ->
volume -> replica), as opposed to test_nbd_clients.py, which tests the NBD layer alone."""

import json
import os

import pytest

from tests.agents import MiB
from tests.clients import fio, run

pytestmark = pytest.mark.integration


@pytest.fixture
def pair(topology):
    return topology(["a", "b"], [("a", "b", "async")], volumes={"data": 32 * MiB, "log": 4 * MiB})


def test_nbdinfo_lists_exports_and_sizes(pair):
    a = pair["a"]
    info = json.loads(run(["nbdinfo", "--json", a.nbd_uri("data")]))
    exp = info["exports"][0]
    assert exp["export-size"] == 32 * MiB and exp["is_read_only"] is False
    assert exp["can_flush"] and exp["can_fua"] and exp["can_multi_conn"] and exp["can_zero"]
    listed = run(["nbdinfo", "--list", f"nbd://127.0.0.1:{a.nbd_port}"])
    assert "data" in listed and "log" in listed


def test_qemu_img_convert_and_nbdcopy_round_trip(pair, tmp_path):
    a = pair["a"]
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(32 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), a.nbd_uri("data")])
    out = tmp_path / "out.img"
    run(["nbdcopy", a.nbd_uri("data"), str(out)])
    assert out.read_bytes() == src.read_bytes()
    src2 = tmp_path / "src2.img"
    src2.write_bytes(os.urandom(4 * MiB))
    run(["nbdcopy", str(src2), a.nbd_uri("log")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src2), a.nbd_uri("log")])
    pair.wait_converged()
    pair.assert_identical()
    # the replica's read-only export serves the same bytes
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), pair["b"].nbd_uri("data")])


def test_fio_verify_through_the_agent(pair):
    out = fio(pair["a"].nbd_uri("data"), rw="randwrite", bs="4k", iodepth=16, size="8M",
              extra=["--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                     "--verify_state_save=0"])
    assert " err= 0" in out  # fio exits non-zero on a mismatch too (verify_fatal)
    pair.wait_converged()
    pair.assert_identical()


def test_whole_volume_discard_is_one_record_and_replicates(topology):
    """mkfs and blkdiscard trim a whole device in requests far larger than the NBD
    max_request and the largest WRITE record; they must journal and replicate."""
    from replicator.capture import nbd as N
    from tests.nbd_fixtures import Client

    topo = topology(["a", "b"], [("a", "b", "sync")], volumes={"big": 96 * MiB})
    a = topo["a"]
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 8M", "-c", "write -P 0x6c 80M 8M",
         a.nbd_uri("big")])
    before = a.group("db")["seq"]
    c = Client(a.nbd_port)
    c.start()
    assert c.go("big")[-1][0] == N.Rep.ACK
    c.request(N.Cmd.TRIM, 0, 96 * MiB, handle=7)
    assert c.reply()[:2] == (0, 7)
    c.close()
    assert a.group("db")["seq"] == before + 1  # one ZERO record, not one per chunk
    topo.wait_converged()
    topo.assert_identical()
    with open(topo["b"].volume_path("db", "big"), "rb") as f:
        f.seek(80 * MiB)
        assert f.read(MiB) == bytes(MiB)
