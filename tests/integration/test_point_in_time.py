"""Point in time on a secondary (issue 19): `retain` keeps the journal and the old
content of every block the window overwrote, `apply_delay` applies late, `rewind
--copy` makes a writable copy at any seq, time or marker of the window, and `promote
--at` takes over at a point before a logical corruption, setting the later records
aside. Real agents, real NBD clients (qemu-io, qemu-img, fio)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime

from replicator.journal.record import iterate
from replicator.journal.segments import Journal
from tests.agents import MiB, fill_up, kinds, replicator_cli, small_fs, wait_until
from tests.clients import fio, qemu_io, run


def _copy_from_nbd(agent, volume: str, path) -> bytes:
    """The primary's image of `volume` as its NBD server shows it, right now."""
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", agent.nbd_uri(volume), str(path)])
    return open(path, "rb").read()


def _applied(agent, seq: int) -> bool:
    return agent.group("db")["applied_seq"] >= seq


def _image(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_rewind_copy_at_a_marker_equals_the_primarys_image_at_it(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], journal_size="512MiB",
                    node_options={"b": {"retain": "256MiB"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    fio(a.nbd_uri("data"), size="16M", runtime=1, bs="4k")
    qemu_io(a.nbd_uri("log"), "write -P 0x5a 0 1M")
    rc, m = replicator_cli(a, "mark", "db", "good")
    assert rc == 0, m
    want = {v: _copy_from_nbd(a, v, tmp_path / f"at-marker-{v}.img") for v in ("data", "log")}
    # The corruption, and more writes over the same blocks after it.
    fio(a.nbd_uri("data"), size="16M", runtime=1, bs="4k")
    qemu_io(a.nbd_uri("log"), "write -P 0x66 0 2M", "write -z 2M 1M")
    seq = topo.wait_converged()
    for to in ("good", str(m["seq"]), "marker:good"):
        out = tmp_path / f"copy-{to.replace(':', '-')}"
        rc, r = replicator_cli(b, "rewind", "db", "--to", to, "--copy", str(out))
        assert rc == 0, r
        assert r["copy"]["seq"] == m["seq"] and r["copy"]["marker"] == "good"
        assert r["copy"]["rewound_from"] >= seq
        manifest = json.loads((out / "snapshot.json").read_text())
        assert manifest["seq"] == m["seq"] and manifest["marker"] == "good"
        for v in ("data", "log"):
            assert _image(out / f"{v}.img") == want[v], (to, v)
    # The replica itself was not touched and kept replicating.
    topo.assert_identical()
    window = b.group("db")["window"]
    assert window["from_seq"] <= m["seq"] < window["to_seq"] == seq, window


def test_time_based_rewind_lands_on_the_last_seq_at_or_before_the_time(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")],
                    node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    for i in range(5):
        qemu_io(a.nbd_uri("data"), f"write -P {0x40 + i} {i}M 64k")
    seq = topo.wait_converged()
    # Record times from b's journal (the primary's clock): pick a time between two.
    b.stop()
    recs = _journal_records(b, seq - 5, seq)
    b.start()
    mid = recs[2]
    when = (mid.time_ns + recs[3].time_ns) // 2
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when // 10**9)) + \
        f".{when % 10**9:09d}"[:7] + "Z"
    # (a microsecond-rounded ISO time; when it rounds before mid's own time, one earlier)
    rc, r = replicator_cli(b, "rewind", "db", "--to", iso, "--copy", str(tmp_path / "t"))
    assert rc == 0, r
    assert r["copy"]["seq"] in (mid.seq, mid.seq - 1) and r["copy"]["seq"] == max(
        x.seq for x in recs if x.time_ns <= _ns(iso)), (r, [(x.seq, x.time_ns) for x in recs])
    data = _image(tmp_path / "t" / "data.img")
    k = r["copy"]["seq"] - (seq - 5)  # how many of the five writes it holds
    for i in range(5):
        block = data[i * MiB:i * MiB + 65536]
        assert block == (bytes([0x40 + i]) * 65536 if i < k else bytes(65536)), i


def _ns(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)


def _journal_records(agent, after: int, through: int | None = None) -> list:
    """The records of a stopped agent's journal of group db."""
    j = Journal(os.path.join(agent.dir, "state", "groups", "db", "journal"), capacity=64 * MiB)
    j.open()
    try:
        return list(j.records(after, through))
    finally:
        j.close()


@contextlib.contextmanager
def _writing(agent, seconds: int):
    """fio writing 4 KiB blocks at 4 MB/s into the agent's `data` for `seconds`, in the
    background; it must end well (it is killed if the block fails)."""
    proc = subprocess.Popen(["fio", "--name=job", "--ioengine=nbd",
                             f"--uri={agent.nbd_uri('data')}", "--rw=randwrite", "--bs=4k",
                             "--iodepth=16", "--size=16M", f"--runtime={seconds}",
                             "--time_based", "--rate=4m"], stdout=subprocess.DEVNULL)
    try:
        yield
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _good_then_bad(topo, tmp_path, good: list[str], bad: list[str]) -> tuple[int, bytes, int]:
    """qemu-io `good` then `bad` commands on the primary's `data`, the secondaries
    converged: (the seq after the good ones, the image then, the last seq)."""
    a = topo[topo.primary]
    qemu_io(a.nbd_uri("data"), *good)
    seq = a.group("db")["seq"]
    want = _copy_from_nbd(a, "data", tmp_path / "good.img")
    qemu_io(a.nbd_uri("data"), *bad)
    return seq, want, topo.wait_converged()


def _leave_rewind_json(agent, **state) -> None:
    """What a crash inside promote --at leaves in a stopped agent's group db."""
    with open(os.path.join(agent.dir, "state", "groups", "db", "rewind.json"), "w") as f:
        json.dump(state, f)


def _block(agent, volume: str, offset: int, length: int) -> bytes:
    with open(agent.volume_path("db", volume), "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_a_delayed_replica_journals_at_once_and_applies_after_the_delay(topology):
    topo = topology(["a", "b"], [("a", "b", "async")],
                    node_options={"b": {"apply_delay": "3s"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    t0 = time.time()
    qemu_io(a.nbd_uri("data"), "write -P 0x77 1M 64k")
    seq = a.group("db")["seq"]
    # Durable on b at once: it counts for the RPO (a's target lag is 0) ...
    wait_until(lambda: a.target("db", "b")["acked_seq"] == seq, 10, "b to ack the write")
    assert time.time() - t0 < 2.5
    g = b.group("db")
    assert g["seq"] == seq and g["applied_seq"] < seq, g
    assert g["window"]["waiting_records"] >= 1 and g["window"]["apply_delay_seconds"] == 3
    assert _block(b, "data", 1 * MiB, 65536) == bytes(65536)  # ... not in the volume yet
    text = run([sys.executable, "-m", "replicator.cli", "status", "-c", b.config_path])
    assert "apply_delay:3s waiting:" in text, text
    # A restart (kill -9) keeps the delay: the record is still not applied early.
    b.kill()
    b.start()
    if time.time() - t0 < 2.5:
        assert b.group("db")["applied_seq"] < seq
        assert _block(b, "data", 1 * MiB, 65536) == bytes(65536)
    wait_until(lambda: _applied(b, seq), 15, "b to apply the write after the delay")
    assert time.time() - t0 >= 3.0
    assert _block(b, "data", 1 * MiB, 65536) == b"\x77" * 65536
    topo.wait_converged()
    topo.assert_identical()


def test_promote_at_on_a_delayed_replica_recovers_the_data_before_a_corruption(topology,
                                                                           tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")],
                    node_options={"b": {"apply_delay": "1h", "retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M", "write -P 0x12 4M 1M")
    good = a.group("db")["seq"]
    want = _copy_from_nbd(a, "data", tmp_path / "good.img")
    # The logical corruption (an operator's mistake: the data overwritten, then discarded).
    qemu_io(a.nbd_uri("data"), "write -P 0xee 0 8M", "discard 8M 4M")
    last = a.group("db")["seq"]
    wait_until(lambda: b.group("db")["seq"] == last, 10, "b to journal everything")
    assert b.group("db")["applied_seq"] < good  # (the delay holds all of it back)
    a.kill()  # the primary is lost (or: stopped, to fail over to the point before)
    rc, r = replicator_cli(b, "promote", "db", "--at", str(good))
    assert rc == 0, r
    assert r["at"]["seq"] == good and r["kept_records"] == last - good, r
    assert r["seq"] == good  # the new generation starts right after the point
    assert _copy_from_nbd(b, "data", tmp_path / "promoted.img") == want
    # The records after the point are kept, not applied: the corruption, to look at.
    with open(r["kept"], "rb") as f:
        kept = list(iterate(f.read()))
    assert [k.seq for k in kept] == list(range(good + 1, last + 1))
    assert kept[0].payload[:4] == b"\xee" * 4
    g = b.group("db")
    assert g["role"] == "primary" and g["window"]["active"] is False
    assert [e["to_seq"] for e in kinds(b, "rewound")] == [good]
    qemu_io(b.nbd_uri("data"), "write -P 0x13 8M 64k")  # and it takes writes
    assert b.group("db")["seq"] == good + 1


def test_promote_at_goes_back_through_the_history_on_a_replica_that_applied_it(topology,
                                                                           tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], journal_size="256MiB",
                    node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    fio(a.nbd_uri("data"), size="16M", bs="4k")
    rc, m = replicator_cli(a, "mark", "db", "before-upgrade")
    assert rc == 0, m
    want = _copy_from_nbd(a, "data", tmp_path / "good.img")
    fio(a.nbd_uri("data"), size="16M", bs="64k")
    last = topo.wait_converged()  # b applied the corruption too
    a.kill()
    rc, r = replicator_cli(b, "promote", "db", "--at", "before-upgrade", "--target", "a:async")
    assert rc == 0, r
    assert r["at"] == {**r["at"], "seq": m["seq"], "marker": "before-upgrade"}
    assert r["kept_records"] == last - m["seq"]
    assert _copy_from_nbd(b, "data", tmp_path / "promoted.img") == want
    # A restart keeps the promoted image (the checkpoint is at the point).
    b.kill()
    b.start()
    assert b.group("db")["seq"] == m["seq"]
    assert _copy_from_nbd(b, "data", tmp_path / "restarted.img") == want
    # The old primary rejoins as a replica (README's step 5): its records after the point
    # are a fork's far side, saved and resynced away; then both hold the good image.
    a.start()
    rc, r = replicator_cli(a, "demote", "db", "--source", "b")
    assert rc == 0, r
    wait_until(lambda: a.group("db")["applied_seq"] == m["seq"] and b.group("db")["targets"]
               and b.target("db", "a")["state"] == "replicating", 60, "a to rejoin")
    assert _image(a.volume_path("db", "data")) == want
    assert a.group("db")["discarded"], a.group("db")


def test_an_interrupted_promote_at_is_finished_and_held_after_a_restart(topology, tmp_path):
    """A crash inside promote --at, after rewind.json was written: the restart takes the
    volumes to the point again (whatever the crash left of the undo) and applies no
    record after it until the operator acts."""
    topo = topology(["a", "b"], [("a", "b", "async")], node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    good, want, last = _good_then_bad(topo, tmp_path, ["write -P 0x21 0 2M"],
                                      ["write -P 0x22 1M 2M", "write -P 0x23 0 512k"])
    a.kill()
    b.kill()
    # What the crash left: rewind.json, and the undo half done (the first before-image
    # written back: 1M..3M holds 0x21 again, 0..512k still the corruption).
    _leave_rewind_json(b, to=good, **{"from": last})
    with open(b.volume_path("db", "data"), "r+b") as f:
        f.seek(1 * MiB)
        f.write(b"\x21" * MiB + bytes(MiB))
    b.start()
    g = b.group("db")
    assert g["applied_seq"] == good and g["window"]["held"], g
    assert "promote --at" in g["window"]["held"]
    assert _image(b.volume_path("db", "data")) == want
    # Held: a plain promote is refused (it would apply the records after the point)...
    rc, r = replicator_cli(b, "promote", "db")
    assert rc != 0 and "a plain promote would apply them" in r["error"], r
    assert b.group("db")["applied_seq"] == good
    rc, r = replicator_cli(b, "promote", "db", "--at", str(good))  # ...this finishes it
    assert rc == 0, r
    assert _copy_from_nbd(b, "data", tmp_path / "promoted.img") == want
    with open(r["kept"], "rb") as f:
        assert [k.seq for k in iterate(f.read())] == list(range(good + 1, last + 1))
    b.kill()
    b.start()  # and it stays so
    assert _copy_from_nbd(b, "data", tmp_path / "restarted.img") == want


def test_retention_drops_the_oldest_points_first_and_status_says_the_window(topology,
                                                                        tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], journal_size="128MiB",
                    node_options={"b": {"retain": "16MiB"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    lows = []
    for i in range(8):  # 4 MiB a round: 8 MiB retained (the records and the old content)
        qemu_io(a.nbd_uri("data"), *[f"write -P {i + 1} {k}M 256k" for k in range(16)])
        topo.wait_converged()
        # The window's bytes come back within retain (plus the file being dropped next)
        # at the checkpointer's next look.
        w = wait_until(lambda: (lambda w: w["retained_bytes"] <= 17 * MiB and w)(
            b.group("db")["window"]), 5, "the window to be trimmed to retain")
        lows.append(w["from_seq"])
    assert lows == sorted(lows) and lows[-1] > lows[0], lows  # the oldest go first
    w = b.group("db")["window"]
    assert w["to_seq"] == a.group("db")["seq"] and w["from_time"] <= w["to_time"]
    rc, r = replicator_cli(b, "rewind", "db", "--to", str(lows[0] - 1 if lows[0] else 0),
                           "--copy", str(tmp_path / "gone"))
    assert rc != 0 and "outside" in r["error"], r
    rc, r = replicator_cli(b, "rewind", "db", "--to", str(w["to_seq"] - 8),
                           "--copy", str(tmp_path / "inside"))
    assert rc == 0, r
    # (the last round wrote 16 blocks with pattern 8: 8 back, half of them are not there)
    data = _image(tmp_path / "inside" / "data.img")
    assert [data[k * MiB] for k in range(16)] == [8] * 8 + [7] * 8


def test_time_retention_keeps_about_the_configured_span(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], node_options={"b": {"retain": "2s"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    qemu_io(a.nbd_uri("data"), "write -P 1 0 64k")
    first = a.group("db")["seq"]
    deadline = time.time() + 4
    while time.time() < deadline:  # keep writing: points older than 2s are dropped
        qemu_io(a.nbd_uri("data"), "write -P 2 1M 64k")
    topo.wait_converged()
    w = wait_until(lambda: (lambda w: w["from_seq"] > first and w)(b.group("db")["window"]),
                   5, "the oldest points to be dropped")
    span = (_ns(w["to_time"]) - _ns(w["from_time"])) / 1e9
    assert 1.0 <= span <= 3.5, w


def test_a_retaining_replica_killed_under_load_still_rewinds_exactly(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], journal_size="256MiB",
                    node_options={"b": {"retain": "128MiB"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    fio(a.nbd_uri("data"), size="16M", runtime=1, bs="4k")
    rc, m = replicator_cli(a, "mark", "db", "m")
    assert rc == 0, m
    want = _copy_from_nbd(a, "data", tmp_path / "m.img")
    wait_until(lambda: _applied(b, m["seq"]), 30, "b to apply through the marker")
    with _writing(a, seconds=4):
        wait_until(lambda: b.group("db")["applied_seq"] > m["seq"] + 1000, 20,
                   "b to apply more records")
        b.kill()
        b.start()
    topo.wait_converged()
    topo.assert_identical()
    rc, r = replicator_cli(b, "rewind", "db", "--to", "m", "--copy", str(tmp_path / "c"))
    assert rc == 0, r
    assert _image(tmp_path / "c" / "data.img") == want


def test_a_retaining_intermediate_verifies_and_resyncs_its_own_target(topology):
    """b keeps a window and feeds c: its volumes lag its journal by a step at most, and
    a verify or resync from b sees what b shows (the step's records laid over)."""
    topo = topology(["a", "b", "c"], [("a", "b", "async"), ("b", "c", "async")],
                    journal_size="256MiB", node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    with _writing(a, seconds=3):
        rc, r = replicator_cli(b, "verify", "db", "c")  # in the stream, while writes flow
        assert rc == 0 and not r["mismatches"], r
        rc, r = replicator_cli(b, "resync", "db", "c", "--full")
        assert rc == 0, r
    topo.wait_converged()
    topo.assert_identical()
    rc, r = replicator_cli(b, "verify", "db", "c")
    assert rc == 0 and not r["mismatches"] and r["bytes_checked"] > 0, r


def test_a_full_disk_under_the_history_holds_the_applies_and_loses_nothing(topology,
                                                                          tmp_path):
    """b's state directory fills up: the before-images cannot be saved, so nothing is
    applied (an apply without them would leave a hole in the window); the records stay
    journaled (reserved space) and acked, status says why, and once there is room the
    applies go on and the window is whole."""
    topo = topology(["a", "b"], [("a", "b", "async")], journal_size="16MiB", start=False,
                    node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    with small_fs(tmp_path / "bstate", "64m") as mnt:
        b.config["state_dir"] = mnt
        b.save_config()
        topo.start()
        topo.wait_converged()
        qemu_io(a.nbd_uri("data"), "write -P 0x31 0 1M")
        rc, m = replicator_cli(a, "mark", "db", "before-full")
        assert rc == 0, m
        want = _copy_from_nbd(a, "data", tmp_path / "m.img")
        wait_until(lambda: _applied(b, m["seq"]), 10, "b to apply through the marker")
        filler = fill_up(mnt)
        qemu_io(a.nbd_uri("data"), "write -P 0x32 0 512k", "write -P 0x33 1M 512k")
        seq = a.group("db")["seq"]
        wait_until(lambda: a.target("db", "b")["acked_seq"] == seq, 10, "b to ack")
        g = wait_until(lambda: (lambda g: g["writes_halted"] and g)(b.group("db")), 10,
                       "b to say why it does not apply")
        assert "No space left" in g["writes_halted"] and g["applied_seq"] == m["seq"], g
        os.unlink(filler)
        wait_until(lambda: _applied(b, seq), 10, "b to apply once there is room")
        assert not b.group("db")["writes_halted"]
        topo.assert_identical()
        rc, r = replicator_cli(b, "rewind", "db", "--to", "before-full",
                               "--copy", str(tmp_path / "c"))
        assert rc == 0, r
        assert _image(tmp_path / "c" / "data.img") == want
        topo.stop()


def test_the_delay_gives_way_when_the_journal_fills_with_records_it_holds(topology):
    """A delayed secondary whose journal is half full of records the delay holds back
    applies them early (an event, status says so) instead of stopping replication (no
    resync: its source never sent it to logging)."""
    topo = topology(["a", "b"], [("a", "b", "async")], journal_size="16MiB",
                    node_options={"b": {"apply_delay": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    for i in range(10):  # 10 MiB into a 16 MiB journal
        qemu_io(a.nbd_uri("data"), f"write -P {i + 1} {i * MiB} 1M")
    seq = a.group("db")["seq"]
    wait_until(lambda: a.target("db", "b")["acked_seq"] == seq, 30, "b to take every record")
    assert a.target("db", "b")["state"] == "replicating"
    wait_until(lambda: kinds(b, "apply_delay_shortened"), 10, "the event")
    g = b.group("db")
    assert 0 < g["applied_seq"] < seq and g["window"]["delay_shortened"], g
    assert seq - g["applied_seq"] <= 4, g  # the oldest went early: a quarter waits
    assert [e["initial"] for e in kinds(a, "resync_started")] == [True]  # no other resync


def test_a_held_replica_applies_nothing_for_a_verify_and_promote_at_needs_the_source_gone(
        topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    qemu_io(a.nbd_uri("data"), "write -P 0x41 0 1M")
    good = a.group("db")["seq"]
    qemu_io(a.nbd_uri("data"), "write -P 0x42 0 1M")
    last = topo.wait_converged()
    rc, r = replicator_cli(b, "promote", "db", "--at", str(good), "--force")
    assert rc != 0 and "still connected" in r["error"], r  # (even forced)
    assert b.group("db")["applied_seq"] == last and b.group("db")["seq"] == last
    b.kill()
    _leave_rewind_json(b, to=good, **{"from": last})
    b.start()  # held at good; a reconnects and verifies
    wait_until(lambda: a.target("db", "b")["state"] == "replicating", 20, "a to reconnect")
    rc, r = replicator_cli(a, "verify", "db", "b")
    assert rc != 0, r  # refused by b (HASH_REFUSED, the link ends), saying why:
    assert "hash request from a: group db: a promote --at seq" in b.log_tail(100)
    g = b.group("db")
    assert g["applied_seq"] == good and g["window"]["held"], g
    assert _block(b, "data", 0, 4) == b"\x41" * 4


def test_a_retaining_replica_promoted_then_demoted_keeps_a_new_window(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    seq = topo.wait_converged()
    a.kill()
    rc, r = replicator_cli(b, "promote", "db")
    assert rc == 0, r
    assert b.group("db")["window"]["active"] is False
    rc, r = replicator_cli(b, "demote", "db", "--source", "a")
    assert rc == 0, r
    w = b.group("db")["window"]
    assert w["active"] and w["from_seq"] == w["to_seq"] == seq, w
    b.kill()
    b.start()
    w = b.group("db")["window"]
    assert w["active"] and w["from_seq"] == seq and b.group("db")["role"] == "secondary", w


def test_promote_at_run_again_after_the_journal_was_cut_keeps_what_was_set_aside(topology,
                                                                              tmp_path):
    """A crash after promote --at cut the journal (before the promotion): the second
    run finds nothing after the point in the journal; the file set aside by the first
    run is what it reports, untouched."""
    topo = topology(["a", "b"], [("a", "b", "async")], node_options={"b": {"retain": "1h"}})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    good, want, last = _good_then_bad(topo, tmp_path, ["write -P 0x51 0 1M"],
                                      ["write -P 0x52 0 1M", "write -P 0x53 2M 1M"])
    a.kill()
    b.kill()
    gdir = os.path.join(b.dir, "state", "groups", "db")
    records = b"".join(_raw_records(b, good))
    kept = os.path.join(gdir, f"kept-after-{good}.journal")
    with open(kept, "wb") as f:  # what the first run set aside, then the cut journal
        f.write(records)
    j = Journal(os.path.join(gdir, "journal"), capacity=64 * MiB)
    j.open()
    point = j.position(good)
    j.truncate_after(good)
    j.close()
    with open(os.path.join(gdir, "group.json")) as f:  # checkpointed at the point first
        state = json.load(f)
    with open(os.path.join(gdir, "group.json"), "w") as f:
        json.dump({**state, "checkpoint": [point.seq, point.hcrc]}, f)
    _leave_rewind_json(b, to=good, kept=kept, kept_records=last - good, **{"from": last})
    b.start()
    assert b.group("db")["window"]["held"]
    rc, r = replicator_cli(b, "promote", "db", "--at", str(good))
    assert rc == 0, r
    assert (r["kept"], r["kept_records"]) == (kept, last - good)
    assert open(kept, "rb").read() == records
    assert _copy_from_nbd(b, "data", tmp_path / "promoted.img") == want


def _raw_records(agent, after: int) -> list[bytes]:
    """The encoded records after `after` of a stopped agent's journal of group db."""
    j = Journal(os.path.join(agent.dir, "state", "groups", "db", "journal"), capacity=64 * MiB)
    j.open()
    try:
        return [bytes(data) for _, _, data in j.chunks(after)]
    finally:
        j.close()
