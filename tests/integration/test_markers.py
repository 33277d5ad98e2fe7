"""Markers (issue 19): named points in the journal, taken on the primary (between
freeze and thaw hooks when asked), that travel down every link: async, a cascade's
second hop, and a periodic link, whose epochs end at each marker so that the replica
holds the image at the marker exactly (its journal has the marker's record close an
epoch; what it applies in one batch may hold several such epochs)."""

from __future__ import annotations

import filecmp
import os

from replicator.journal.record import FLAG_OPEN, Kind
from replicator.journal.segments import Journal
from tests.agents import MiB, kinds, replicator_cli, wait_until
from tests.clients import qemu_io


def _markers(agent) -> list[tuple[str, int]]:
    rc, r = replicator_cli(agent, "markers", "db")
    assert rc == 0, r
    return [(m["name"], m["seq"]) for m in r["markers"]]


def test_markers_travel_down_every_link_and_survive_a_restart(topology, tmp_path):
    topo = topology(["a", "b", "c", "d"],
                    [("a", "b", "async"), ("b", "c", "async"),
                     ("a", "d", "periodic", {"interval": 10.0})])
    a = topo["a"]
    log = tmp_path / "hooks.log"
    # Right after an epoch went to d, so that the next one holds all of this: writes,
    # a marker, more writes, a marker, more writes.
    topo.wait_converged()  # (initial syncs done: what follows goes as records)
    qemu_io(a.nbd_uri("data"), "write -P 0x10 15M 4k")
    seq = a.group("db")["seq"]
    wait_until(lambda: (a.target("db", "d")["last_epoch"] or {}).get("seq") == seq, 30,
               "the epoch of that write to d")
    qemu_io(a.nbd_uri("data"), *[f"write -P 0x11 {i}M 64k" for i in range(4)])
    rc, m1 = replicator_cli(a, "mark", "db", "before-upgrade",
                            "--freeze", f"echo freeze >> {log}", "--thaw", f"echo thaw >> {log}")
    assert rc == 0, m1
    assert m1["consistent"] and m1["seq"] == a.group("db")["seq"]
    assert log.read_text().split() == ["freeze", "thaw"]
    qemu_io(a.nbd_uri("data"), *[f"write -P 0x22 {i}M 128k" for i in range(4)])
    rc, m2 = replicator_cli(a, "mark", "db", "after-upgrade")
    assert rc == 0 and not m2["consistent"] and m2["seq"] > m1["seq"]
    qemu_io(a.nbd_uri("data"), "write -P 0x33 0 64k", "write -P 0x44 8M 64k")
    topo.wait_converged()
    want = [("before-upgrade", m1["seq"]), ("after-upgrade", m2["seq"])]
    for node in "abcd":
        assert _markers(topo[node]) == want, node
        assert [e["name"] for e in kinds(topo[node], "marker")] == [n for n, _ in want]
    topo.assert_identical()
    # The periodic replica's journal: each marker closes an epoch (no FLAG_OPEN), the
    # writes before it in its epoch do not (so d can show the image at each marker).
    d = topo["d"]
    d.stop()
    j = Journal(os.path.join(d.dir, "state", "groups", "db", "journal"), capacity=64 * MiB)
    j.open()
    try:
        recs = {r.seq: r for r in j.records(m1["seq"] - 2, m2["seq"])}
    finally:
        j.close()
    for m in (m1, m2):
        marker, before = recs[m["seq"]], recs[m["seq"] - 1]
        assert (marker.kind, marker.volume, marker.flags) == (Kind.MARKER, m["name"], 0)
        assert before.kind is Kind.WRITE and before.flags == FLAG_OPEN
    d.start()

    # Status says how many and which was last; a restart (kill -9) keeps them.
    assert topo["c"].group("db")["markers"]["count"] == 2
    assert topo["c"].group("db")["markers"]["last"]["name"] == "after-upgrade"
    topo["c"].kill()
    topo["c"].start()
    assert _markers(topo["c"]) == want


def test_marks_that_cannot_be_taken_are_refused_and_say_why(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")])
    a, b = topo["a"], topo["b"]
    assert replicator_cli(a, "mark", "db", "m1")[0] == 0
    rc, r = replicator_cli(a, "mark", "db", "m1")
    assert rc == 1 and "exists already" in r["error"]
    rc, r = replicator_cli(b, "mark", "db", "m2")
    assert rc == 1 and "primary" in r["error"]
    rc, r = replicator_cli(a, "mark", "db", "bad name!")
    assert rc == 1 and "marker name" in r["error"]
    # A freeze that fails: no marker, and the thaw still runs.
    log = tmp_path / "thaw.log"
    rc, r = replicator_cli(a, "mark", "db", "m3", "--freeze", "echo no >&2; exit 3",
                           "--thaw", f"echo thaw >> {log}")
    assert rc == 1 and "exited 3" in r["error"] and "no marker" in r["error"]
    assert log.read_text().split() == ["thaw"]
    # A freeze that hangs is killed at the hook timeout.
    rc, r = replicator_cli(a, "mark", "db", "m4", "--freeze", "sleep 30",
                           "--thaw", "true", "--hook-timeout", "0.5")
    assert rc == 1 and "did not finish" in r["error"]
    rc, r = replicator_cli(a, "mark", "db", "m5", "--freeze", "true")
    assert rc == 1 and "go together" in r["error"]
    assert [n for n, _ in _markers(a)] == ["m1"]
    wait_until(lambda: _markers(b) == _markers(a), 30, "the marker on b")
    assert filecmp.cmp(a.volume_path("db", "data"), b.volume_path("db", "data"), shallow=False)
