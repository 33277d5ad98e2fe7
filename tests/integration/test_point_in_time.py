"""Point in time on a secondary (issue 19): `retain` keeps the journal and the old
content of every block the window overwrote, `apply_delay` applies late, `rewind
--copy` makes a writable copy at any seq, time or marker of the window, and `promote
--at` takes over at a point before a logical corruption, setting the later records
aside. Real agents, real NBD clients (qemu-io, qemu-img, fio)."""

from __future__ import annotations

import json
import os
import subprocess
import time

from replicator.journal.record import iterate
from tests.agents import MiB, replicator_cli, wait_until
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
    for to in ("good", str(m["seq"]), f"marker:good"):
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
    from replicator.journal.segments import Journal
    j = Journal(os.path.join(b.dir, "state", "groups", "db", "journal"), capacity=64 * MiB)
    j.open()
    try:
        recs = list(j.records(seq - 5, seq))
    finally:
        j.close()
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
    from datetime import datetime
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)
