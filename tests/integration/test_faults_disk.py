"""Full disks and outages, on real agents (issue 13, items 1, 2 and 10): a volume or a
state directory on a small tmpfs that fills up for real, mounted here and always
unmounted."""

from __future__ import annotations

import errno
import os
import signal
import time

from replicator.capture import nbd as N
from tests.clients import qemu_io
from tests.agents import MiB, fill_up, replicator_cli, resize_fs, small_fs, wait_until
from tests.nbd_fixtures import Client


class Writer:
    """One NBD connection to one export; each write returns the NBD error (0: done).
    Like a database, it flushes after each write (a write completes once journaled; the
    volume is written when its commit makes it durable)."""

    def __init__(self, agent, volume: str):
        self.c = Client(agent.nbd_port)
        self.c.start()
        assert self.c.go(volume)[-1][0] == N.Rep.ACK
        self.handle = 0

    def write(self, offset: int, data: bytes) -> int:
        err = self._request(N.Cmd.WRITE, offset, len(data), data)
        return err or self._request(N.Cmd.FLUSH, 0, 0, b"")

    def _request(self, cmd, offset: int, length: int, data: bytes) -> int:
        self.handle += 1
        self.c.request(cmd, offset, length, handle=self.handle, data=data)
        err, handle, _ = self.c.reply()
        assert handle == self.handle
        return err

    def close(self) -> None:
        self.c.close()


def sparse_volume_in(agent, mnt: str) -> None:
    """The agent's first volume becomes a sparse image in `mnt` (a small file system)."""
    vol = agent.config["groups"][0]["volumes"][0]
    vol["path"], vol["allocation"] = os.path.join(mnt, "data.img"), "sparse"
    agent.save_config()


def test_a_volume_write_that_fails_enospc_reaches_the_volume_when_space_returns(topology, tmp_path):
    """Item 1: records journaled and replicated whose volume write fails ENOSPC (a sparse
    image on a full file system) are applied once there is room; applied_seq and the
    checkpoint never pass them; after kill -9 and restart both nodes are identical."""
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 8 * MiB}, start=False)
    a = topo["a"]
    with small_fs(tmp_path / "avol", "1m") as mnt:
        sparse_volume_in(a, mnt)
        topo.start()
        topo.wait_converged()
        w = Writer(a, "data")
        results = [w.write(i * 64 * 1024, bytes([i + 1]) * 64 * 1024) for i in range(24)]
        w.close()
        assert results[0] == 0 and errno.ENOSPC in results, results
        g = a.group("db")
        assert g["applied_seq"] < g["seq"], g  # journaled, not in the volume
        assert g["checkpoint_seq"] <= g["applied_seq"] and g["writes_halted"], g
        assert all(r == errno.ENOSPC for r in results[results.index(errno.ENOSPC):]), results
        # The checkpointer keeps retrying; it must not move past the missing records.
        wait_until(lambda: a.target("db", "b")["acked_seq"] == g["seq"], 30, "b to have them")
        g2 = a.group("db")
        assert (g2["applied_seq"], g2["seq"]) == (g["applied_seq"], g["seq"])
        assert g2["checkpoint_seq"] <= g["applied_seq"], g2
        resize_fs(mnt, "16m")
        wait_until(lambda: (lambda g: g["applied_seq"] == g["seq"] and not g["writes_halted"])(
            a.group("db")), 20, "a to apply the records its volume refused")
        w = Writer(a, "data")
        assert w.write(0, b"\xee" * 4096) == 0  # writes are accepted again
        w.close()
        a.kill(signal.SIGKILL)
        a.start()
        topo.wait_converged()
        topo.assert_identical()
        # Every write that completed was journaled; those the volume refused at first
        # (they completed before their commit tried the volume) are in it now.
        with open(a.volume_path("db", "data"), "rb") as f:
            for i in [i for i, r in enumerate(results) if r == 0][1:]:  # 0: overwritten
                f.seek(i * 64 * 1024)
                assert f.read(64 * 1024) == bytes([i + 1]) * 64 * 1024, i
        topo.stop()



def test_a_resync_waits_for_the_volumes_to_hold_every_journaled_record(topology, tmp_path):
    """Item 1: a target's initial sync reads the primary's volumes as the image after
    the journal's last seq; while a volume write is refused (full file system) that
    image lacks records, so the resync must wait instead of shipping it."""
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 8 * MiB}, start=False)
    a, b = topo["a"], topo["b"]
    with small_fs(tmp_path / "avol", "1m") as mnt:
        sparse_volume_in(a, mnt)
        a.start()
        w = Writer(a, "data")
        results = [w.write(i * 64 * 1024, bytes([i + 1]) * 64 * 1024) for i in range(24)]
        w.close()
        assert errno.ENOSPC in results, results
        b.start()  # its initial sync starts while a's volume lacks a record
        wait_until(lambda: a.target("db", "b")["state"] == "resyncing", 20, "b's initial sync")
        resize_fs(mnt, "16m")
        topo.wait_converged()
        topo.assert_identical()
        topo.stop()



def test_a_replica_whose_volume_write_fails_applies_the_record_when_space_returns(topology,
                                                                                  tmp_path):
    """Item 1 on a replica: records it journaled but could not write to its (sparse,
    full) volume are applied later, never skipped, and survive its kill -9."""
    topo = topology(["a", "b"], [("a", "b", "async", {"initial_sync": "assume-clean"})],
                    volumes={"data": 8 * MiB}, start=False)  # both blank: b stays sparse
    a, b = topo["a"], topo["b"]
    with small_fs(tmp_path / "bvol", "1m") as mnt:
        sparse_volume_in(b, mnt)
        topo.start()
        topo.wait_converged()
        w = Writer(a, "data")
        assert [w.write(i * 64 * 1024, bytes([i + 1]) * 64 * 1024) for i in range(24)] == [0] * 24
        w.close()
        seq = a.group("db")["seq"]
        wait_until(lambda: b.group("db")["seq"] == seq, 20, "b to journal every record")
        wait_until(lambda: b.group("db")["writes_halted"], 20, "b's commit to try the volume")
        g = b.group("db")
        assert g["applied_seq"] < seq and g["durable_seq"] == seq, g
        b.kill(signal.SIGKILL)  # what it journaled and did not apply is replayed...
        resize_fs(mnt, "16m")  # ...once there is room
        b.start()
        topo.wait_converged()
        topo.assert_identical()
        topo.stop()


def test_lag_seconds_is_the_age_of_the_oldest_write_a_logging_target_lacks(topology):
    """Item 10: with an async target stopped, lag_seconds keeps growing after the target
    went to logging and the journal trimmed the records it lacks (it used to read 0.0)."""
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 8 * MiB},
                    journal_size="16MiB", heartbeat_timeout=2.0)
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    b.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        qemu_io(a.nbd_uri("data"), "write -P 0x51 0 64k")  # the oldest write b lacks
        wait_until(lambda: a.target("db", "b")["state"] == "logging", 30, "b to go to logging")
        for i in range(12):  # 6 journal segments of 2 MiB: the first one is trimmed
            qemu_io(a.nbd_uri("data"), f"write -P {i} {(i % 8) * MiB} 1M")
        acked = a.target("db", "b")["acked_seq"]
        wait_until(lambda: a.group("db")["journal"]["first_seq"] > acked + 1, 30,
                   "the journal to trim the records b lacks")
        t1 = a.target("db", "b")
        assert t1["lag_records"] > 0 and t1["lag_seconds"] >= time.monotonic() - started - 0.5, t1
        first = t1["lag_seconds"]
        wait_until(lambda: a.target("db", "b")["lag_seconds"] >= first + 1.0, 10,
                   "lag_seconds to keep growing")
        a.kill(signal.SIGKILL)  # the age survives a restart (the journal no longer has it)
        a.start()
        assert a.target("db", "b")["lag_seconds"] >= first + 1.0
    finally:
        b.proc.send_signal(signal.SIGCONT)
    topo.wait_converged()
    assert a.target("db", "b")["lag_seconds"] == 0.0


def test_an_initial_sync_keeps_no_undo_log_and_a_later_resync_does(topology):
    """Item 3: a new target has no consistent image to protect, so its initial sync must
    not save the old content of every region first (a volume's worth of extra writes);
    a resync of a target that holds an image still does."""
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 8 * MiB},
                    group_options={"resync_rate": "2MiB"}, start=False)
    a, b = topo["a"], topo["b"]
    a.start()
    qemu_io(a.nbd_uri("data"), "write -P 0x33 0 8M")
    b.start()
    undo = os.path.join(b.config["state_dir"], "groups", "db", "resync.undo")
    sizes = []

    def resync_at(done_bytes):
        sizes.append(os.path.getsize(undo) if os.path.exists(undo) else 0)
        return (a.target("db", "b")["resync"] or {}).get("done_bytes", 0) >= done_bytes

    wait_until(lambda: resync_at(4 * MiB), 30, "the initial sync to be half done")
    assert max(sizes) == 0, sizes
    topo.wait_converged()
    topo.assert_identical()
    rc, _ = replicator_cli(a, "resync", "db", "b", "--full")
    assert rc == 0
    sizes.clear()
    wait_until(lambda: resync_at(4 * MiB), 30, "the full resync to be half done")
    assert max(sizes) > 0, sizes  # b's image is protected while it is overwritten
    topo.wait_converged()
    topo.assert_identical()


def test_a_full_state_file_system_neither_fails_writes_nor_stops_a_restart(topology, tmp_path):
    """Item 2: the primary's state directory on a small file system that something else
    fills up, an async target stopped: the journal's space was reserved at start, so
    writes go on (the target goes to logging when the journal is full), checkpoints
    still trim it, kill -9 and restart work, and the target catches up afterwards."""
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 8 * MiB},
                    journal_size="16MiB", heartbeat_timeout=2.0, start=False)
    a, b = topo["a"], topo["b"]
    with small_fs(a.config["state_dir"], "24m") as state:
        topo.start()
        topo.wait_converged()
        fill_up(state)
        # A write larger than a journal segment is the one thing that needs fresh
        # space: it fails, and status says the journal is full until a write succeeds.
        w = Writer(a, "data")
        assert w.write(0, b"\x77" * (4 * MiB)) == errno.ENOSPC
        w.close()
        assert a.group("db")["journal"]["full"] is True
        qemu_io(a.nbd_uri("data"), "write -P 0x78 0 1M")
        assert a.group("db")["journal"]["full"] is False
        b.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(40):  # 40 MiB through a 16 MiB journal
                qemu_io(a.nbd_uri("data"), f"write -P {i + 1} {(i % 8) * MiB} 1M")
            g = a.group("db")
            assert a.target("db", "b")["state"] == "logging" and not g["writes_halted"], g
            assert "journal is full" in a.log_tail(400)  # why b went to logging
            assert g["journal"]["used_bytes"] <= g["journal"]["capacity_bytes"], g
            a.kill(signal.SIGKILL)
            a.start()  # on a full disk: needs no fresh space
            for i in range(4):
                qemu_io(a.nbd_uri("data"), f"write -P {0x80 + i} {i * MiB} 1M")
        finally:
            b.proc.send_signal(signal.SIGCONT)
        topo.wait_converged(90)
        topo.assert_identical()
        topo.stop()
