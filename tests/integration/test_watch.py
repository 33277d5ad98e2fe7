"""Watch capture with real agents and real writers: the primary's watched file on a
loop-mounted XFS (reflink=1) or ext4, written by sqlite, fio and a plain writer, and
every epoch the replica applies checked as an image of the file."""

import contextlib
import filecmp
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from tests.agents import MiB, loop_fs, replicator_cli, wait_until
from tests.clients import run

pytestmark = pytest.mark.integration


@pytest.fixture
def mounted(tmp_path):
    """mounted(fstype): a file system of that type in a loop image, unmounted at the
    end; a test names it before `topology`, so the agents are killed first."""
    with contextlib.ExitStack() as stack:
        def make(fstype: str, size: str = "300M") -> str:
            tool = {"xfs": "mkfs.xfs", "ext4": "mkfs.ext4"}[fstype]
            if shutil.which(tool) is None:
                pytest.skip(f"needs {tool} for a loop-mounted {fstype}")
            n = len(list(tmp_path.glob("fs-*.img")))
            return stack.enter_context(loop_fs(tmp_path / f"fs-{n}", fstype, size))
        yield make


def watched(topology, path: str, size: int = 64 * MiB, journal_size: str = "64MiB",
            replica_path: str | None = None, **options):
    """Primary p watches `path` (volume "db" of group "db"), replica r takes its epochs
    (into `replica_path`, or a file of its own directory)."""
    topo = topology(["p", "r"], [("p", "r", "async")], volumes={"db": size}, start=False,
                    journal_size=journal_size,
                    node_options={"p": {"interval": 1, "quiet": 0.3, **options}})
    for node in ("p", "r"):
        vol = topo[node].config["groups"][0]["volumes"][0]
        vol["capture"] = "watch"
        vol["path"] = {"p": path, "r": replica_path or vol["path"]}[node]
        topo[node].save_config()
    return topo.start()


def two_sites(mounted, topology, content: int, size: int):
    """p watches a file of `content` random bytes on its own XFS; r's volume is a file of
    the same name on another XFS (what a takeover or switchover watches there)."""
    path_p = os.path.join(mounted("xfs"), "vm.img")
    path_r = os.path.join(mounted("xfs"), "vm.img")
    with open(path_p, "wb") as f:
        f.write(os.urandom(content))
    return watched(topology, path_p, size=size, replica_path=path_r), path_p, path_r


def epoch_image(replica, copy_to: str) -> int | None:
    """Copy the replica's volume while it shows one epoch's image: its applied seq
    before and after the copy agree (an epoch is applied within one turn of its loop);
    that seq, or None."""
    before = replica.group("db")
    shutil.copyfile(replica.volume_path("db", "db"), copy_to)
    after = replica.group("db")
    if before["applied_seq"] != after["applied_seq"] or before["inconsistent"] \
            or after["inconsistent"] or not before["applied_seq"]:
        return None
    return after["applied_seq"]


def converged(topo, path: str, primary: str = "p", replica: str = "r") -> None:
    """The replica holds the watched file's content as the last epoch captured it."""
    p, r = topo[primary], topo[replica]

    def done():
        g = p.group("db")
        return g["watch"]["state"] == "idle" and r.group("db")["applied_seq"] == g["seq"] \
            and g["targets"][0]["state"] == "replicating" \
            and same_content(path, r.volume_path("db", "db"))
    wait_until(done, 60, "the replica to apply the file's last epoch", interval=0.2)


def same_content(watched_file: str, replica_file: str) -> bool:
    """The replica's volume is the watched file, zeroes past the file's end."""
    size = os.path.getsize(watched_file)
    with open(watched_file, "rb") as a, open(replica_file, "rb") as b:
        if a.read() != b.read(size):
            return False
        return b.read().count(0) == os.path.getsize(replica_file) - size


SQLITE_WRITER = textwrap.dedent("""
    import os, sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, pad BLOB)")
    i = db.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
    while True:
        i += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, randomblob(?))", (i, 200 + i % 1000))
        db.execute("UPDATE t SET pad = randomblob(300) WHERE id = ?", (max(1, i // 3),))
        db.execute("COMMIT")
        time.sleep(0.002)
""")

CHECKPOINT = ("{python} -c \"import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=30); "
              "sys.exit(c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0])\" {db}")


def test_sqlite_every_epoch_is_a_whole_database(mounted, topology, tmp_path):
    mnt = mounted("xfs")
    db = os.path.join(mnt, "app.db")
    writer = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, db])
    try:
        wait_until(lambda: os.path.exists(db + "-wal"), 10, "the writer to start")
        topo = watched(topology, db, size=32 * MiB, consistency="reflink",
                       freeze=CHECKPOINT.format(python=sys.executable, db=db), thaw="true")
        checked, last_id = set(), 0
        copy = str(tmp_path / "copy.db")

        def check_one_epoch():
            nonlocal last_id
            seq = epoch_image(topo["r"], copy)
            if seq is None or seq in checked:
                return False
            con = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
            try:
                assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], seq
                top = con.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
            finally:
                con.close()
            assert top >= last_id, f"epoch at seq {seq}: last id {top} after {last_id}"
            last_id = top
            checked.add(seq)
            return len(checked) >= 5 and last_id > 0
        wait_until(check_one_epoch, 60, "5 epochs checked at the replica", interval=0.1)
        watch = topo["p"].group("db")["watch"]
        assert watch["consistency"] == "reflink" and watch["epochs"] >= 5, watch
        assert watch["last_epoch"]["bytes"] > 0 and watch["error"] is None, watch
    finally:
        writer.kill()
        writer.wait()


def test_a_writer_busy_across_several_epochs_is_captured_to_its_last_write(mounted, topology):
    """A busy writer: the first event of a change stops the events (sizes and times say
    when writes stop), and the capture arms them again before its image, so a write
    made while an epoch is being taken is in the next one."""
    path = os.path.join(mounted("xfs"), "busy.img")
    with open(path, "wb") as f:
        f.write(os.urandom(8 * MiB))
    topo = watched(topology, path, size=8 * MiB)
    converged(topo, path)
    epochs = topo["p"].group("db")["watch"]["epochs"]
    with open(path, "r+b") as f:
        i = 0
        while i % 500 or topo["p"].group("db")["watch"]["epochs"] < epochs + 3:  # 1 s each
            i += 1
            os.pwrite(f.fileno(), i.to_bytes(8, "little") * 512, (i * 4096) % (8 * MiB))
    converged(topo, path)


def test_fio_verifies_on_the_replica(mounted, topology, tmp_path):
    mnt = mounted("xfs")
    path = os.path.join(mnt, "disk.img")
    topo = watched(topology, path, size=32 * MiB)
    job = ["--name=w", "--ioengine=psync", "--rw=randwrite", "--bs=4k", "--size=24M",
           "--verify=crc32c", "--do_verify=0", "--verify_state_save=0"]
    run(["fio", f"--filename={path}", *job])
    converged(topo, path)
    run(["fio", f"--filename={topo['r'].volume_path('db', 'db')}", "--verify_only", *job])
    watch = topo["p"].group("db")["watch"]
    assert watch["epochs"] >= 1 and watch["last_epoch"]["find_ms"] < 1000, watch
    table = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "-c",
                            topo["p"].config_path], capture_output=True, text=True).stdout
    assert "watch reflink  idle  epochs:" in table, table


def test_ext4_with_freeze_hooks(mounted, topology, tmp_path):
    mnt = mounted("ext4")
    path = os.path.join(mnt, "data.img")
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
    topo = watched(topology, path, size=16 * MiB, consistency="hooks",
                   freeze=f"fsfreeze -f {mnt}", thaw=f"fsfreeze -u {mnt}")
    converged(topo, path)
    try:
        with open(path, "r+b") as f:
            for i in range(40):
                f.seek(i * 97 * 4096)
                f.write(os.urandom(5000))
                f.flush()
        converged(topo, path)
    finally:
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)  # never left frozen
    watch = topo["p"].group("db")["watch"]
    assert watch["consistency"] == "hooks" and watch["epochs"] >= 1, watch
    assert watch["error"] is None, watch


def test_kill_both_sides_mid_epoch(mounted, topology, tmp_path):
    mnt = mounted("xfs", "600M")
    path = os.path.join(mnt, "big.img")
    size = 96 * MiB  # an epoch of two parts
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    topo = watched(topology, path, size=size, journal_size="256MiB")
    p, r = topo["p"], topo["r"]
    converged(topo, path)
    pattern = 1

    def rewrite_all():
        nonlocal pattern
        pattern += 1
        with open(path, "r+b") as f:
            for at in range(0, size, 4 * MiB):
                f.seek(at)
                f.write(bytes([pattern]) * (4 * MiB))  # one epoch of several parts

    rewrite_all()
    wait_until(lambda: p.group("db")["open_epoch"], 30,
               "the primary to journal the first part of an epoch", interval=0.01)
    p.kill()
    p.start()  # its last clone is still there: no resync, the next epoch closes the open one
    converged(topo, path)
    with open(p.log_path) as f:
        log = f.read()
    assert "an epoch that does not close yet: the next epoch closes it" in log
    assert log.count("started without the last epoch's image") == 1

    rewrite_all()
    copy = str(tmp_path / "copy.img")
    wait_until(lambda: r.group("db")["open_epoch"], 30,
               "the replica to journal the first part of an epoch", interval=0.01)
    r.kill()
    with open(r.volume_path("db", "db"), "rb") as f:  # never a mix of two epochs
        assert len(set(f.read())) == 1
    r.start()
    converged(topo, path)
    with open(r.log_path) as f:
        assert "an epoch that does not close yet: applied once the rest of it arrives" in f.read()
    assert epoch_image(r, copy) is not None and filecmp.cmp(copy, path, shallow=False)


def test_reflink_on_a_file_system_without_it_is_a_clear_error(mounted, topology):
    mnt = mounted("ext4")
    path = os.path.join(mnt, "data.img")
    with open(path, "wb") as f:
        f.write(b"\x01" * MiB)
    topo = watched(topology, path, size=4 * MiB)
    watch = wait_until(lambda: topo["p"].group("db")["watch"], 20, "status")
    assert watch["state"] == "error" and "ext4" in watch["error"] \
        and "consistency hooks or none" in watch["error"], watch
    assert "has no reflinks" in topo["p"].log_tail()


def test_hooks_refuse_a_file_on_the_state_file_system(topology, tmp_path):
    path = str(tmp_path / "same-fs.img")
    topo = topology(["p", "r"], [("p", "r", "async")], volumes={"db": 4 * MiB}, start=False,
                    node_options={"p": {"consistency": "hooks", "freeze": "true",
                                        "thaw": "true"}})
    p = topo["p"]
    p.config["groups"][0]["volumes"][0].update(capture="watch", path=path)
    p.save_config()
    p.start(wait=False)
    assert p.proc.wait(20) == 1
    assert "a freeze hook would freeze the journal too" in p.log_tail()


def test_a_freeze_hook_that_fails_or_hangs_still_thaws(mounted, topology, tmp_path):
    mnt = mounted("ext4")
    path = os.path.join(mnt, "data.img")
    thawed = tmp_path / "thawed"
    with open(path, "wb") as f:
        f.write(b"\x02" * MiB)
    topo = watched(topology, path, size=4 * MiB, consistency="hooks", hook_timeout=0.5,
                   freeze="sleep 30", thaw=f"touch {thawed}")
    watch = topo["p"].group("db")["watch"]  # the first capture ran before it answered
    assert watch["state"] == "error" and "did not finish in 0.5s" in watch["error"], watch
    assert thawed.exists() and watch["epochs"] == 0


def test_none_is_crash_inconsistent_and_a_file_must_fit_its_volume(mounted, topology):
    mnt = mounted("ext4")
    path = os.path.join(mnt, "live.img")
    topo = watched(topology, path, size=2 * MiB, consistency="none")  # no file yet: zeroes
    assert topo["p"].group("db")["watch"]["consistency"] == "none (crash-inconsistent)"
    with open(path, "wb") as f:
        f.write(os.urandom(3 * MiB))
    wait_until(lambda: "more than its volume" in (topo["p"].group("db")["watch"]["error"]
                                                  or ""), 20, "the file too large refused")
    os.truncate(path, MiB + 12345)  # fits again: the rest of the volume reads as zeroes
    converged(topo, path)
    assert topo["p"].group("db")["watch"]["error"] is None


def test_switchover_moves_the_watch_and_back(mounted, topology):
    topo, path_p, path_r = two_sites(mounted, topology, 4 * MiB, 8 * MiB)
    p, r = topo["p"], topo["r"]
    converged(topo, path_p)
    with open(path_p, "r+b") as f:  # the program's last writes before it stops
        f.write(b"\x5a" * 8192)
    rc, out = replicator_cli(p, "switchover", "db", "--to", "r")
    assert rc == 0, out
    assert same_content(path_p, path_r)  # the last epoch went before the drain
    assert r.group("db")["watch"]["watching"] and not p.group("db")["watch"]["watching"]
    with open(path_r, "r+b") as f:  # the program now runs on r
        f.seek(3 * MiB)
        f.write(b"\xa5" * 70000)
    converged(topo, path_r, primary="r", replica="p")
    rc, out = replicator_cli(r, "switchover", "db", "--to", "p")
    assert rc == 0, out
    with open(path_p, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x33" * 5000)
    converged(topo, path_p)


def test_an_epoch_too_large_for_the_journal_is_refused(mounted, topology):
    path = os.path.join(mounted("xfs"), "huge.img")
    topo = watched(topology, path, size=32 * MiB, journal_size="16MiB")
    with open(path, "wb") as f:
        f.write(os.urandom(9 * MiB))
    wait_until(lambda: "does not fit the journal" in (topo["p"].group("db")["watch"]["error"]
                                                      or ""), 20, "the epoch refused")
    os.truncate(path, MiB)
    converged(topo, path)


def test_takeover_watches_the_promoted_replica_across_a_restart(mounted, topology):
    topo, path_p, path_r = two_sites(mounted, topology, 2 * MiB, 4 * MiB)
    p, r = topo["p"], topo["r"]
    converged(topo, path_p)
    p.kill()  # the primary's site is lost
    rc, out = replicator_cli(r, "promote", "db")
    assert rc == 0, out
    assert r.group("db")["watch"]["watching"]
    for restart in (False, True):
        if restart:  # a runtime role (group.json), not the config's: still watched
            r.stop()
            r.start()
        seq = r.group("db")["seq"]
        with open(path_r, "r+b") as f:  # the program now runs on r
            f.seek(MiB)
            f.write(os.urandom(5000))
        wait_until(lambda: r.group("db")["seq"] > seq and
                   r.group("db")["watch"]["state"] == "idle", 20, "an epoch on r")


def test_takeover_then_failback_of_a_watched_primary(mounted, topology):
    """p watches its file; r takes over when p's site is lost, with epochs p journaled
    that never reached r; p comes back, is demoted (its unshipped epochs rolled back: the
    agent now writes p's file as a replica's volume), and the failback makes p the
    watched primary again."""
    topo, path_p, path_r = two_sites(mounted, topology, 4 * MiB, 4 * MiB)
    p, r = topo["p"], topo["r"]
    converged(topo, path_p)
    r.kill()
    seq = p.group("db")["seq"]
    with open(path_p, "r+b") as f:  # an epoch that never reaches r
        f.write(b"\x66" * 65536)
    wait_until(lambda: p.group("db")["seq"] > seq and p.group("db")["watch"]["state"] == "idle",
               20, "p's epoch that r never gets")
    p.kill()  # the primary's site is lost
    r.start()
    rc, out = replicator_cli(r, "promote", "db", "--target", "p:async")
    assert rc == 0, out
    with open(path_r, "r+b") as f:  # the program now runs on r
        f.seek(2 * MiB)
        f.write(b"\x77" * 70000)
    p.start()  # believes it is primary (and watches) until the operator demotes it
    rc, d = replicator_cli(p, "demote", "db", "--source", "r")
    assert rc == 0, d
    assert not p.group("db")["watch"]["watching"]
    converged(topo, path_r, primary="r", replica="p")  # rolled back onto r's line
    with open(path_p, "rb") as f:
        assert f.read(65536) != b"\x66" * 65536
    rc, out = replicator_cli(r, "failback", "db", "--to", "p")
    assert rc == 0, out
    assert p.group("db")["watch"]["watching"] and not r.group("db")["watch"]["watching"]
    with open(path_p, "r+b") as f:  # and the program runs on p again
        f.seek(MiB)
        f.write(b"\x55" * 4096)
    converged(topo, path_p)
