"""Outages: a target that is away (or too far behind for the journal) goes to logging
with a dirty-region bitmap, and is resynced from it when it returns; crashes on either
side during logging or resync lose nothing; an interrupted resync can be rolled back."""

import shutil
import subprocess
import sys

from tests.agents import MiB, wait_until
from tests.clients import fio, qemu_io

VOLUMES = {"data": 64 * MiB, "log": 16 * MiB}


def _target_state(agent, node, state):
    t = agent.target("db", node)
    return t if t["state"] == state else None


def _workload(a, seed):
    # Random 4 KiB writes and large sequential ones: more than the 16 MiB journal holds.
    fio(a.nbd_uri("data"), size="48M", extra=["--io_size=8M", f"--randseed={seed}"])
    qemu_io(a.nbd_uri("data"), f"write -P {seed % 250 + 1} 8M 24M")
    qemu_io(a.nbd_uri("log"), f"write -P {seed % 250 + 2} 0 12M")


def test_logging_then_resync_after_journal_overflow(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes=VOLUMES, journal_size="16MiB",
                    heartbeat_timeout=1.5)
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    b.kill()
    _workload(a, 1)  # completes: writes never wait for an absent target
    t = wait_until(lambda: _target_state(a, "b", "logging"), 20, "b to be logging")
    assert t["dirty_bytes"] > 0
    g = a.group("db")
    assert not g["journal"]["full"] and g["journal"]["used_bytes"] <= 16 * MiB
    b.start()
    topo.wait_converged(120)
    topo.assert_identical()
    assert a.target("db", "b")["state"] == "replicating"
    assert b.group("db")["inconsistent"] is False
    assert "resync complete" in open(a.log_path).read()


def test_primary_killed_during_logging_keeps_its_bitmap(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes=VOLUMES, journal_size="16MiB",
                    heartbeat_timeout=1.5)
    a, b = topo["a"], topo["b"]
    b.kill()
    _workload(a, 2)
    wait_until(lambda: _target_state(a, "b", "logging"), 20, "b to be logging")
    a.kill()  # SIGKILL
    a.start()
    assert a.target("db", "b")["state"] == "logging"  # the bitmap survived kill -9
    qemu_io(a.nbd_uri("log"), "write -P 0x77 4M 1M")
    b.start()
    topo.wait_converged(120)
    topo.assert_identical()


def test_target_killed_during_resync_resumes(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes=VOLUMES, journal_size="16MiB",
                    heartbeat_timeout=1.5, group_options={"resync_rate": "12MiB"})
    a, b = topo["a"], topo["b"]
    b.kill()
    _workload(a, 3)
    wait_until(lambda: _target_state(a, "b", "logging"), 20, "b logging")
    b.start()
    r = wait_until(lambda: (lambda r: r if r and r["done_bytes"] > r["total_bytes"] // 3 else None)(
        a.target("db", "b")["resync"]), 30, "a third of the resync")
    first = r["total_bytes"]
    b.kill()
    left = wait_until(lambda: _target_state(a, "b", "logging"), 20, "b logging again")["dirty_bytes"]
    assert left < first * 0.8, f"resync restarted from zero: {left} of {first} bytes dirty"
    # A write issued during the resync lands with its newest content.
    b.start()
    wait_until(lambda: a.target("db", "b")["state"] == "resyncing", 20, "resync resumed")
    qemu_io(a.nbd_uri("data"), "write -P 0xee 8M 2M")
    topo.wait_converged(120)
    topo.assert_identical()
    assert qemu_io(b.nbd_uri("data"), "read -P 0xee 8M 2M", read_only=True)


def test_interrupted_resync_rolls_back_to_the_last_consistent_image(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes=VOLUMES, journal_size="16MiB",
                    heartbeat_timeout=1.5, group_options={"resync_rate": "8MiB"})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 16M")
    topo.wait_converged()
    keep = {v: tmp_path / f"{v}.consistent" for v in VOLUMES}
    for v, path in keep.items():  # the primary's image at that seq, as held by b
        shutil.copyfile(b.volume_path("db", v), path)
    b.kill()
    _workload(a, 4)
    wait_until(lambda: _target_state(a, "b", "logging"), 20, "b logging")
    b.start()
    wait_until(lambda: (lambda r: r and r["done_bytes"] > 4 * MiB)(
        a.target("db", "b")["resync"]), 30, "resync under way")
    a.kill()  # the source is lost mid-resync
    st = wait_until(lambda: (lambda g: g if g["inconsistent"] and not g["upstream"] else None)(
        b.group("db")), 20, "b inconsistent and without its source")
    out = subprocess.run([sys.executable, "-m", "replicator.cli", "rollback", "db", "-c",
                          b.config_path, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert b.group("db")["inconsistent"] is False
    for v, path in keep.items():
        with open(b.volume_path("db", v), "rb") as f1, open(path, "rb") as f2:
            assert f1.read() == f2.read(), f"{v} is not the last consistent image"
    assert st["consistent_seq"] == b.group("db")["applied_seq"]


def test_on_disconnect_block_holds_writes_until_the_target_is_back(topology):
    """A target with on_disconnect: block: while it is away a write is journaled but not
    completed; when it is back (and resynced) the write completes and is on it."""
    topo = topology(["a", "b", "c"], [("a", "b", "async", {"on_disconnect": "block"}),
                                      ("a", "c", "async")], heartbeat_timeout=1.5)
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    wait_until(lambda: _target_state(a, "b", "replicating"), 30, "b replicating")
    assert a.group("db")["writes_blocked_by"] == []
    b.kill()
    wait_until(lambda: a.group("db")["writes_blocked_by"] == ["b"], 20, "writes blocked by b")
    seq = a.group("db")["seq"]
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k",
                               a.nbd_uri("data")], stdout=subprocess.PIPE, text=True)
    try:
        # Journaled and shipped to c, but not completed to the client.
        wait_until(lambda: topo["c"].group("db")["applied_seq"] > seq, 20, "write on c")
        assert writer.poll() is None, "a write completed while a blocking target was away"
        b.start()
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "wrote 65536/65536 bytes" in out
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert a.group("db")["writes_blocked_by"] == []
    topo.wait_converged()
    topo.assert_identical()
