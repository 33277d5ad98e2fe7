"""The durability contract with real NBD clients (DESIGN.md, issue 14): writes complete
once journaled and readable, FLUSH and FUA make them durable here and on in-sync sync
targets, and status tells which is which (seq, durable_seq, flush_seq; per target
written_seq and durable_seq).

commit_interval is set long (60 s) so that nothing but the clients' own flushes makes
writes durable while a test looks; the target of the first tests is not started, so no
shipper waits for records (which would commit at once)."""

from __future__ import annotations

import os

import pytest

from tests.agents import MiB, wait_until
from tests.clients import fio, qemu_io, run

pytestmark = pytest.mark.integration

LAZY = {"commit_interval": 60}


@pytest.fixture
def lone(topology):
    """Primary a with its async target b down: only flushes commit."""
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 16 * MiB},
                    group_options=LAZY, start=False)
    topo["a"].start()
    return topo["a"]


def _volume_bytes(agent, offset: int, length: int) -> bytes:
    with open(agent.volume_path("db", "data"), "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_unflushed_writes_complete_are_readable_and_become_durable_at_a_flush(lone):
    a = lone
    # fio's nbd engine flushes only when asked (--fsync, --end_fsync): here it does not.
    fio(a.nbd_uri("data"), rw="write", bs="64k", iodepth=4, size="4M",
        extra=["--buffer_pattern=0x5a"])
    g = a.group("db")
    assert g["seq"] == 64 and g["durable_seq"] == 0 and g["flush_seq"] == 0, g
    assert _volume_bytes(a, 0, 4096) == bytes(4096)  # the volume waits for durability
    # ... but every read sees the completed writes (read-only qemu-io sends no flush)
    qemu_io(a.nbd_uri("data"), "read -P 0x5a 0 4M", read_only=True)
    assert a.group("db")["durable_seq"] == 0
    qemu_io(a.nbd_uri("data"), "flush")
    g = a.group("db")
    assert g["seq"] == g["durable_seq"] == g["flush_seq"] == 64, g
    assert _volume_bytes(a, 0, 4096) == b"\x5a" * 4096


def test_fio_fsync_and_fua_are_flush_points(lone):
    a = lone
    fio(a.nbd_uri("data"), rw="randwrite", bs="4k", iodepth=8, size="2M",
        extra=["--fsync=16", "--end_fsync=1"])
    g = a.group("db")
    assert g["flush_seq"] == g["durable_seq"] == g["seq"] > 0, g
    before = g["seq"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 4k")  # qemu's close flushes too
    qemu_io(a.nbd_uri("data"), "write -f -P 0x12 1M 4k")  # -f: FUA
    g = a.group("db")
    assert g["flush_seq"] == g["seq"] == before + 2, g


def test_nbdcopy_flushes_only_when_asked_and_qemu_img_convert_does(lone, tmp_path):
    a = lone
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    run(["nbdcopy", str(src), a.nbd_uri("data")])
    g = a.group("db")
    assert g["seq"] > 0 and g["flush_seq"] == 0, g  # plain nbdcopy: a volatile cache's copy
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), a.nbd_uri("data")])
    run(["nbdcopy", "--flush", str(src), a.nbd_uri("data")])
    g = a.group("db")
    assert g["flush_seq"] == g["seq"], g
    src.write_bytes(os.urandom(8 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), a.nbd_uri("data")])
    g = a.group("db")
    assert g["flush_seq"] == g["seq"], g
    assert _volume_bytes(a, 0, 8 * MiB) == src.read_bytes()


def test_durability_write_makes_every_write_durable(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 16 * MiB},
                    group_options={**LAZY, "durability": "write"}, start=False)
    a = topo["a"]
    a.start()
    fio(a.nbd_uri("data"), rw="randwrite", bs="4k", iodepth=8, size="2M")
    g = a.group("db")
    assert g["durable_seq"] == g["flush_seq"] == g["seq"] > 0, g


def test_a_flush_waits_for_the_sync_target_to_make_it_durable(topology):
    """With a sync target in sync, a write completes once b has written it; the flush
    once b has made it durable (its ACK says both)."""
    topo = topology(["a", "b"], [("a", "b", "sync")], volumes={"data": 16 * MiB},
                    group_options=LAZY)
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    fio(a.nbd_uri("data"), rw="randwrite", bs="4k", iodepth=8, size="1M")
    seq = a.group("db")["seq"]
    t = a.target("db", "b")
    assert t["written_seq"] == seq, t  # every completed write is written on b
    qemu_io(a.nbd_uri("data"), "flush")
    t, g = a.target("db", "b"), a.group("db")
    assert g["flush_seq"] == g["seq"] and t["durable_seq"] >= g["flush_seq"], (g, t)
    wait_until(lambda: b.group("db")["durable_seq"] >= g["flush_seq"], 5, "b durable")
    topo.wait_converged()
    topo.assert_identical()


def test_a_target_holding_records_the_primary_lost_in_a_power_loss_is_rolled_back(topology):
    """A power loss of the primary loses the journal records it had not made durable,
    after it had shipped them to its sync target (which completes writes before they
    are durable). On restart, the target holds more than the primary: never flushed, so
    nobody was promised them; the primary (which knows it did not stop cleanly) rolls
    the target back to its own image by a checksum resync, on its own.

    The power loss is simulated: kill -9, then the primary's journal is cut back to its
    durable seq, which is what a power loss leaves (the volume only ever holds durable
    records; the page cache of the rest is gone)."""
    from replicator.journal.segments import Journal

    topo = topology(["a", "b"], [("a", "b", "sync")], volumes={"data": 16 * MiB},
                    group_options=LAZY)
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    qemu_io(a.nbd_uri("data"), "write -P 0x21 0 1M")  # closes with a flush: durable
    fio(a.nbd_uri("data"), rw="randwrite", bs="4k", iodepth=4, size="1M",
        extra=["--number_ios=100", "--buffer_pattern=0x22"])  # completed, never flushed
    g = a.group("db")
    durable, seq = g["durable_seq"], g["seq"]
    assert durable < seq and a.target("db", "b")["written_seq"] == seq, g
    a.kill()
    j = Journal(os.path.join(a.dir, "state", "groups", "db", "journal"), capacity=64 * MiB)
    j.open()
    seg = j._segment_of(durable + 1)
    cut = seg.offsets[durable + 1 - seg.first_seq]
    j.close()
    os.truncate(seg.path, cut)  # the power loss: what was not durable is gone
    a.start()
    assert a.group("db")["seq"] == durable
    topo.wait_converged()
    topo.assert_identical()
    assert b.group("db")["seq"] == a.group("db")["seq"]
    with open(a.log_path) as f:
        assert "which this node lost when it went down" in f.read()
