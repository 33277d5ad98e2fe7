"""Failover: planned switchover and back with no write lost, takeover of a replica when
the primary is gone, fast failback of the old primary (its unshipped writes rolled back
and kept, only changed regions sent), and split brain refused on both sides until the
operator resolves it."""

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

from tests.agents import MiB, kinds, replicator_cli, wait_until
from tests.clients import qemu_io

SIZE = 16 * MiB


def _role(agent):
    return agent.group("db")["role"]


def _identical(topo, nodes, volume="data"):
    ref = topo[nodes[0]].volume_path("db", volume)
    return all(filecmp.cmp(ref, topo[n].volume_path("db", volume), shallow=False)
               for n in nodes[1:])


def _converged(topo, primary, nodes):
    def ok():
        g = topo[primary].group("db")
        return (all(topo[n].group("db")["applied_seq"] == g["seq"] for n in nodes)
                and all(t["state"] == "replicating" for t in g["targets"] if t["node"] in nodes))
    wait_until(ok, 60, f"{nodes} to hold every record of {primary}")


def _with_bunker(topology, size=SIZE, **options):
    """a ships sync to the bunker k (journal only) and async to the far replica c, whose
    group names k as its bunker."""
    return topology(["a", "k", "c"], [("a", "k", "sync", {"bunker": True}), ("a", "c", "async")],
                    volumes={"data": size}, bunkers=["k"], node_options={"c": {"bunker": "k"}},
                    **options)


def _far_replica_behind(topo) -> int:
    """Everyone holds a first image; then c is down while a writes more (k, sync, gets
    it). Returns a's last seq."""
    a = topo["a"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 4M")
    _converged(topo, "a", ["c", "k"])
    topo["c"].kill()
    qemu_io(a.nbd_uri("data"), "write -P 0x22 1M 2M", "write -P 0x33 12M 64k")
    return a.group("db")["seq"]


def _write_fails(agent):
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4k",
                        agent.nbd_uri("data")], capture_output=True, text=True)
    return p.returncode != 0 or "failed" in (p.stdout + p.stderr).lower()


def test_switchover_and_back_loses_nothing(topology):
    topo = topology(["a", "b", "c"], [("a", "b", "sync"), ("a", "c", "async")],
                    volumes={"data": SIZE})
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x11 0 8M")
    _converged(topo, "a", ["b", "c"])
    wait_until(lambda: topo["a"].target("db", "b")["state"] == "replicating", 30, "a -> b")

    rc, r = replicator_cli(topo["a"], "switchover", "db", "--to", "b")
    assert rc == 0, r
    assert (r["from"], r["to"]) == ("a", "b") and r["drained"]["b"] == r["seq"]
    assert r["reparent_needed"] == []  # c was named b in the stream (SUCCESSOR)
    assert _role(topo["b"]) == "primary" and _role(topo["a"]) == "secondary"
    assert topo["b"].group("db")["generations"] == 2
    assert _write_fails(topo["a"])  # the old primary is read-only now
    (promoted,) = kinds(topo["b"], "promoted")
    assert promoted["group"] == "db" and promoted["generation"] == \
        topo["b"].group("db")["generation"]
    assert [e["source"] for e in kinds(topo["a"], "demoted")] == ["b"]
    # b ships to a (reversed) and to c (re-pointed), and is writable.
    qemu_io(topo["b"].nbd_uri("data"), "write -P 0x22 4M 8M")
    _converged(topo, "b", ["a", "c"])
    assert _identical(topo, ["b", "a", "c"])
    assert {t["node"] for t in topo["b"].group("db")["targets"]} == {"a", "c"}

    wait_until(lambda: topo["b"].target("db", "a")["state"] == "replicating", 30, "b -> a")
    rc, back = replicator_cli(topo["b"], "switchover", "db", "--to", "a")
    assert rc == 0, back
    assert _role(topo["a"]) == "primary" and _role(topo["b"]) == "secondary"
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x33 0 1M")
    _converged(topo, "a", ["b", "c"])
    assert _identical(topo, ["a", "b", "c"])
    assert topo["a"].group("db")["seq"] > back["seq"] > r["seq"]


def test_a_target_away_during_a_switchover_is_reparented_by_hand(topology):
    """The old primary names the new one to its other targets in the stream (SUCCESSOR);
    one that was away cannot hear it, and a later generation is no authority: it keeps
    refusing the new primary until the operator re-points it."""
    topo = topology(["a", "b", "c"], [("a", "b", "sync"), ("a", "c", "async")],
                    volumes={"data": SIZE})
    a, b, c = topo["a"], topo["b"], topo["c"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    _converged(topo, "a", ["b", "c"])
    c.kill()
    rc, r = replicator_cli(a, "switchover", "db", "--to", "b")
    assert rc == 0 and r["reparent_needed"] == ["c"], r
    qemu_io(b.nbd_uri("data"), "write -P 0x22 0 64k")
    c.start()
    t = wait_until(lambda: b.target("db", "c") if b.target("db", "c")["state"] == "refused"
                   else None, 30, "b -> c refused")
    assert "WRONG_SOURCE" in t["last_error"] and "reparent db --source b" in t["last_error"]
    assert c.group("db")["source"] == "a"
    rc, r = replicator_cli(c, "reparent", "db", "--source", "b")
    assert rc == 0, r
    _converged(topo, "b", ["a", "c"])
    assert _identical(topo, ["b", "a", "c"])


def test_switchover_to_a_target_that_is_away_is_refused(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    topo["b"].kill()
    rc, err = replicator_cli(topo["a"], "switchover", "db", "--to", "b")
    assert rc == 1 and "needs it replicating" in err["error"]
    assert _role(topo["a"]) == "primary"
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x44 0 64k")  # still writable


def test_takeover_then_fast_failback_of_the_old_primary(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": SIZE})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 16M")
    _converged(topo, "a", ["b"])
    b.kill()
    qemu_io(a.nbd_uri("data"), "write -P 0x66 1M 128k")  # never reaches b
    a.kill()  # the primary's site is lost

    b.start()
    rc, err = replicator_cli(b, "promote", "db")
    assert rc == 0, err  # no source connected: allowed
    assert _role(b) == "primary"
    qemu_io(b.nbd_uri("data"), "write -P 0x77 8M 256k")  # the new primary's writes

    rc, p = replicator_cli(b, "promote", "db", "--target", "a:async")
    assert rc == 1 and "only a secondary is promoted" in p["error"]
    # b learns of a as a target the way the failover playbook does it: config + restart.
    b.config["groups"][0]["role"] = "primary"
    b.config["groups"][0]["source"] = None
    b.config["groups"][0]["targets"] = [{"node": "a", "mode": "async"}]
    b.save_config()
    b.stop()
    b.start()
    a.start()  # comes back believing it is primary, and stays so: b's later generation
    # is no authority over a; the operator demotes it (what failback.yml runs)
    wait_until(lambda: b.target("db", "a")["state"] == "refused", 30, "b -> a refused")
    assert "NOT_REPLICA" in b.target("db", "a")["last_error"]
    assert _role(a) == "primary"
    rc, d = replicator_cli(a, "demote", "db", "--source", "b")
    assert rc == 0 and d["changed"] is True, d
    wait_until(lambda: b.target("db", "a")["state"] == "replicating", 60, "b -> a replicating")
    assert _role(a) == "secondary" and a.group("db")["source"] == "b"
    assert _write_fails(a)
    _converged(topo, "b", ["a"])
    assert _identical(topo, ["b", "a"])
    shipped = b.target("db", "a")["bytes_sent"]
    assert 0 < shipped <= 1 * MiB, f"failback shipped {shipped} bytes of a {SIZE}-byte volume"
    (kept,) = a.group("db")["discarded"]
    index = json.load(open(os.path.join(kept, "index.json")))
    assert index["fork"] == int(b.group("db")["generation"].split("@")[1]) - 1
    with open(a.volume_path("db", "data"), "rb") as f:
        f.seek(1 * MiB)
        assert f.read(4) == b"\x11" * 4  # a's unshipped write was rolled back

    # fail back: the primary role returns to a with a switchover
    rc, r = replicator_cli(b, "failback", "db", "--to", "a")
    assert rc == 0, r
    assert r["to"] == "a" and r["rejoin_bytes"] == shipped and r["volume_bytes"] == SIZE
    assert _role(a) == "primary" and _role(b) == "secondary"
    rc, err = replicator_cli(b, "failback", "db", "--to", "a")
    assert rc == 1 and "run the failback on the current primary" in err["error"]
    qemu_io(a.nbd_uri("data"), "write -P 0x55 0 64k")
    _converged(topo, "a", ["b"])
    assert _identical(topo, ["a", "b"])


def test_restore_after_failback_returns_every_link_to_its_configured_mode(topology):
    """A takeover ships async to everyone; after the failback, `restore` must bring back
    the configured links: b sync again (not just listed), c async with zstd."""
    topo = topology(["a", "b", "c"], [("a", "b", "sync"), ("a", "c", "async", "zstd")],
                    volumes={"data": SIZE})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    _converged(topo, "a", ["b", "c"])
    a.kill()
    wait_until(lambda: b.group("db")["upstream"] is None, 20, "b to lose its source")
    rc, r = replicator_cli(b, "promote", "db", "--target", "a:async", "--target", "c:async")
    assert rc == 0, r
    # the operator's acts of a takeover (failover.yml / failback.yml): the survivor c is
    # re-pointed to b, the old primary a demoted to a replica of b when it is back
    rc, r = replicator_cli(topo["c"], "reparent", "db", "--source", "b")
    assert rc == 0, r
    a.start()
    rc, r = replicator_cli(a, "demote", "db", "--source", "b")
    assert rc == 0, r
    rc, r = replicator_cli(b, "failback", "db", "--to", "a")
    assert rc == 0, r
    assert {t["node"]: t["mode"] for t in a.group("db")["targets"]} == {"b": "async", "c": "async"}
    for node in ("a", "b", "c"):
        rc, r = replicator_cli(topo[node], "restore", "db")
        assert rc == 0, r
    links = {t["node"]: (t["mode"], t["compress"]) for t in a.group("db")["targets"]}
    assert links == {"b": ("sync", "none"), "c": ("async", "zstd")}
    assert a.group("db")["role_from"] == "config"
    _converged(topo, "a", ["b", "c"])
    qemu_io(a.nbd_uri("data"), "write -P 0x99 2M 64k")
    assert b.group("db")["seq"] == a.group("db")["seq"]  # sync again: on b when it returns
    _converged(topo, "a", ["b", "c"])
    assert _identical(topo, ["a", "b", "c"])


def test_split_brain_is_refused_on_both_sides_until_resolved(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": SIZE})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 4M")
    _converged(topo, "a", ["b"])
    # Isolate the two (address books point nowhere), promote both, write on both.
    good = {n: topo[n].config["peers"][p] for n, p in (("a", "b"), ("b", "a"))}
    for n, p in (("a", "b"), ("b", "a")):
        topo[n].stop()
        topo[n].config["peers"][p] = "127.0.0.1:9"
        topo[n].save_config()
        topo[n].start()
    rc, _ = replicator_cli(b, "promote", "db", "--target", "a:async")
    assert rc == 0
    rc, _ = replicator_cli(a, "demote", "db", "--source", "b")
    assert rc == 0
    rc, _ = replicator_cli(a, "promote", "db", "--target", "b:async")
    assert rc == 0
    qemu_io(a.nbd_uri("data"), "write -P 0xaa 0 64k")
    qemu_io(b.nbd_uri("data"), "write -P 0xbb 2M 64k")
    for n, p in (("a", "b"), ("b", "a")):  # the network heals
        topo[n].stop()
        topo[n].config["peers"][p] = good[n]
        topo[n].save_config()
        topo[n].start()
    for n, p in (("a", "b"), ("b", "a")):
        wait_until(lambda: topo[n].target("db", p)["state"] == "split-brain", 30,
                   f"{n}: split-brain")
        assert topo[n].group("db")["split_brain"] and _role(topo[n]) == "primary"
        assert p in {e["target"] for e in kinds(topo[n], "split_brain")}

    rc, r = replicator_cli(a, "resolve", "db", "--discard-local", "--survivor", "b")
    assert rc == 0, r
    wait_until(lambda: b.target("db", "a")["state"] == "replicating", 60, "b -> a")
    _converged(topo, "b", ["a"])
    assert _identical(topo, ["b", "a"])
    assert not b.group("db")["split_brain"]
    (kept,) = a.group("db")["discarded"]
    index = json.load(open(os.path.join(kept, "index.json")))
    regions = {(r["volume"], r["offset"]) for r in index.get("regions", [])}
    assert not index["complete"] or ("data", 0) in regions
    if index["complete"]:
        with open(os.path.join(kept, "regions.bin"), "rb") as f:
            assert f.read(4) == b"\xaa" * 4  # a's discarded write is kept


def test_takeover_through_a_bunker_loses_no_acknowledged_write(topology):
    """a ships sync to bunker k (journal only) and async to the far c. c falls behind,
    the primary's site is lost; promoting c first replays from k what c lacks."""
    topo = _with_bunker(topology)
    a, k, c = topo["a"], topo["k"], topo["c"]
    seq = _far_replica_behind(topo)
    assert k.group("db")["seq"] == seq  # sync: on the bunker before it was acknowledged
    t = wait_until(lambda: a.target("db", "k") if a.target("db", "k")["far_lag_records"]["c"]
                   else None, 10, "bunker lag shown")
    assert t["bunker"] and t["far_lag_records"]["c"] > 0
    rc, err = replicator_cli(a, "verify", "db", "k")
    assert rc == 1 and "is a bunker" in err["error"]
    a.kill()  # the primary's site is lost with the writes c never got

    c.start()
    rc, r = replicator_cli(c, "promote", "db")
    assert rc == 0, r
    assert r["bunker_replay"]["replayed"] > 0 and r["bunker_replay"]["to_seq"] == seq
    assert r["rpo_records"] == 0
    assert c.group("db")["seq"] == seq and _role(c) == "primary"
    assert _identical(topo, ["a", "c"])  # every acknowledged write of a is on c


def test_bunker_keeps_what_the_far_replica_lacks_and_says_when_it_cannot(topology):
    """The primary tells its bunker (RETAIN) how far the far replicas got: the bunker
    keeps every record after that and trims the rest. When the far replica lags more
    than logging_high_water, the bunker says a takeover replay is short, and a
    takeover through it is refused with the reason."""
    topo = _with_bunker(topology, journal_size="16MiB")
    a, k, c = topo["a"], topo["k"], topo["c"]
    qemu_io(a.nbd_uri("data"), *(f"write -P 0x11 {m}M 1M" for m in range(6)))
    _converged(topo, "a", ["c", "k"])
    seq = a.group("db")["seq"]
    b = wait_until(lambda: k.group("db")["bunker"] if k.group("db")["bunker"]["far_seq"] == seq
                   else None, 10, "the bunker to hear how far c got")
    assert b == {"far_seq": seq, "far_lag_records": 0, "covers_far_replicas": True}
    # 6 MiB is half of what it may hold (logging_high_water): only c's position trims it
    wait_until(lambda: k.group("db")["journal"]["first_seq"] > 1, 20,
               "the bunker to drop what c holds")

    c.kill()
    qemu_io(a.nbd_uri("data"), *(f"write -P 0x22 {m}M 1M" for m in range(6)))
    b = wait_until(lambda: k.group("db")["bunker"] if k.group("db")["bunker"]["far_lag_records"]
                   else None, 10, "the bunker to count what c lacks")
    assert b["far_seq"] == seq and b["covers_far_replicas"]
    assert k.group("db")["journal"]["first_seq"] <= seq + 1  # kept for c

    qemu_io(a.nbd_uri("data"), *(f"write -P 0x33 {m}M 1M" for m in range(14)))  # > high water
    b = wait_until(lambda: k.group("db")["bunker"] if not k.group("db")["bunker"]
                   ["covers_far_replicas"] else None, 30, "the bunker to report its overrun")
    assert b["far_seq"] == seq and "OVERRUN" in subprocess.run(
        [sys.executable, "-m", "replicator.cli", "status", "-c", k.config_path],
        capture_output=True, text=True).stdout
    a.kill()
    c.start()
    wait_until(lambda: c.group("db")["upstream"] is None, 20, "c to have no source")
    rc, err = replicator_cli(c, "promote", "db")
    assert rc == 1 and f"does not hold c's position {seq}" in err["error"], err
    assert _role(c) == "secondary"


def test_takeover_of_a_replica_past_its_bunker_replays_nothing(topology):
    """The primary is lost with a write in flight that reached the far replica but not
    the bunker (so it was never acknowledged): the promote through the bunker finds
    nothing to replay and succeeds, keeping that write."""
    topo = _with_bunker(topology)
    a, k, c = topo["a"], topo["k"], topo["c"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    _converged(topo, "a", ["c", "k"])
    seq = a.group("db")["seq"]
    k.proc.send_signal(signal.SIGSTOP)
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x44 2M 64k",
                               a.nbd_uri("data")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: c.group("db")["seq"] > seq, 10, "c to get the unacknowledged write")
        assert writer.poll() is None  # still waiting for the bunker
        a.kill()
        k.kill()  # stopped before the record reached it: it never held it
    finally:
        writer.kill()
        writer.wait()
    k.start()
    wait_until(lambda: c.group("db")["upstream"] is None, 20, "c to have no source")
    rc, r = replicator_cli(c, "promote", "db")
    assert rc == 0, r
    assert r["bunker_replay"]["replayed"] == 0 and r["rpo_records"] == 0, r
    assert c.group("db")["seq"] == seq + 1 and _role(c) == "primary"


def test_promoting_a_copy_leaves_the_replica_replicating(topology, tmp_path):
    """The non-destructive drill: `promote --copy DIR` on the far replica, while its
    primary is unreachable, snapshots the replica and replays the bunker into the
    snapshot: the copy holds every acknowledged write; the replica itself is untouched
    and catches up when its primary is back."""
    topo = _with_bunker(topology)
    a, k, c = topo["a"], topo["k"], topo["c"]
    seq = _far_replica_behind(topo)
    behind = c_before = None
    a.proc.send_signal(signal.SIGSTOP)  # c gets nothing more from a
    try:
        c.start()
        c_before = c.group("db")
        behind = c_before["seq"]
        assert behind < seq
        copy = tmp_path / "drill"
        rc, r = replicator_cli(c, "promote", "db", "--copy", str(copy))
        assert rc == 0, r
        assert r["role"] == "copy" and r["seq"] == seq and r["rpo_records"] == 0
        assert r["bunker_replay"]["replayed"] == seq - behind
        assert filecmp.cmp(str(copy / "data.img"), a.volume_path("db", "data"), shallow=False)
        with open(copy / "snapshot.json") as f:
            assert json.load(f)["seq"] == seq
        after = c.group("db")
        assert (after["role"], after["seq"], after["generation"]) == \
            ("secondary", behind, c_before["generation"])
        rc, err = replicator_cli(c, "promote", "db", "--copy", str(copy))
        assert rc == 1 and "not empty" in err["error"]
        rc, err = replicator_cli(k, "promote", "db", "--copy", str(tmp_path / "k"))
        assert rc == 1 and "only a secondary" in err["error"]
        k.kill()
        rc, err = replicator_cli(c, "promote", "db", "--copy", str(tmp_path / "again"))
        assert rc == 1 and "unreachable" in err["error"], err
        assert not os.path.exists(tmp_path / "again")  # a failed copy leaves nothing behind
        k.start()
    finally:
        a.proc.send_signal(signal.SIGCONT)
    _converged(topo, "a", ["c", "k"])
    assert _role(a) == "primary" and _role(c) == "secondary" and _identical(topo, ["a", "c"])


def test_a_copy_taken_under_load_holds_every_write_acknowledged_before_it(topology, tmp_path):
    """The replica applies records all through the copy: the snapshot is still one
    image of the primary's history (a prefix of the ledger's writes), and with the
    bunker's records replayed into it, holds every write acknowledged before it began."""
    topo = _with_bunker(topology, size=64 * MiB)
    a, c = topo["a"], topo["c"]
    qemu_io(a.nbd_uri("data"), "write -P 0x5a 0 64M")  # a copy with data to read
    _converged(topo, "a", ["c", "k"])
    led = str(tmp_path / "ledger.jsonl")
    writer = subprocess.Popen([sys.executable, "-m", "replicator.drill.ledger", "write", "--nbd",
                               f"127.0.0.1:{a.nbd_port}", "--export", "data", "--ledger", led,
                               "--seconds", "60", "--fsync-every", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: open(led).read().count('"ack"') >= 200, 30, "200 acknowledged writes")
        cut = time.time()
        rc, r = replicator_cli(c, "promote", "db", "--copy", str(tmp_path / "copy"))
        assert rc == 0 and r["rpo_records"] == 0, r
        assert writer.poll() is None  # the workload ran all through the copy
    finally:
        writer.terminate()
        writer.wait(30)
    p = subprocess.run([sys.executable, "-m", "replicator.drill.ledger", "check", "--ledger", led,
                        "--image", str(tmp_path / "copy" / "data.img"), "--acked-before", repr(cut),
                        "--json"], capture_output=True, text=True)
    result = json.loads(p.stdout)
    assert p.returncode == 0 and result["rpo_writes_lost"] == 0, result
    assert result["prefix"] is True and result["acknowledged"] >= 200
    assert _role(c) == "secondary"


def test_takeover_without_its_bunker_is_refused_unless_told(topology):
    topo = _with_bunker(topology)
    _converged(topo, "a", ["c"])
    topo["a"].kill()
    topo["k"].kill()
    wait_until(lambda: topo["c"].group("db")["upstream"] is None, 20, "c to lose its source")
    rc, err = replicator_cli(topo["c"], "promote", "db")
    assert rc == 1 and "bunker k" in err["error"] and "unreachable" in err["error"]
    assert _role(topo["c"]) == "secondary"
    rc, r = replicator_cli(topo["c"], "promote", "db", "--no-bunker")
    assert rc == 0 and r["bunker_replay"] is None and r["rpo_records"] is None, r


def test_loss_of_an_intermediate_reparents_its_downstream_without_a_full_copy(topology):
    topo = topology(["a", "b", "c"], [("a", "b", "async"), ("b", "c", "async")],
                    volumes={"data": SIZE}, journal_size="16MiB")
    a, b, c = topo["a"], topo["b"], topo["c"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 16M")
    topo.wait_converged()
    b.kill()  # the intermediate is lost
    qemu_io(a.nbd_uri("data"), "write -P 0x22 2M 256k")
    rc, r = replicator_cli(c, "reparent", "db", "--source", "a")
    assert rc == 0 and r["source"] == "a", r
    rc, r = replicator_cli(a, "attach", "db", "--target", "c:async")
    assert rc == 0 and r["targets"] == ["b", "c"], r
    _converged(topo, "a", ["c"])
    assert _identical(topo, ["a", "c"])
    # c held a's line up to b's loss: only what it lacked moved, never the volume
    assert a.target("db", "c")["bytes_sent"] < 2 * MiB
    rc, err = replicator_cli(a, "attach", "db", "--target", "c:async")
    assert rc == 1 and "already ships to c" in err["error"]


def test_without_a_bunker_the_promoted_replica_is_a_prefix_and_rpo_is_counted(topology, tmp_path):
    """A writer logs every acknowledged write; the primary dies mid-workload; the async
    replica promoted without a bunker holds a prefix of the writes (no hole, no
    reordering), and the writes it lacks are exactly the acknowledged ones past its seq."""
    topo = topology(["a", "c"], [("a", "c", "async")], volumes={"data": SIZE})
    a, c = topo["a"], topo["c"]
    topo.wait_converged()
    s0 = c.group("db")["seq"]
    ledger = str(tmp_path / "ledger.jsonl")
    writer = subprocess.Popen(
        [sys.executable, "-m", "replicator.cli", "drill", "ledger", "write",
         "--nbd", f"127.0.0.1:{a.nbd_port}", "--export", "data", "--ledger", ledger,
         "--seconds", "60", "--timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.exists(ledger) and
                   sum(1 for line in open(ledger) if '"ack"' in line) > 300, 30, "acked writes")
        a.kill()  # mid-workload
        writer.wait(30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    rc, r = replicator_cli(c, "promote", "db")
    assert rc == 0 and r["bunker_replay"] is None and r["rpo_records"] is None, r
    check = subprocess.run([sys.executable, "-m", "replicator.cli", "drill", "ledger", "check",
                            "--ledger", ledger, "--image", c.volume_path("db", "data"), "--json"],
                           capture_output=True, text=True)
    result = json.loads(check.stdout)
    assert result["prefix"] is True and result["holes"] == 0, result
    on_c = c.group("db")["seq"] - s0  # one 4 KiB write = one record
    assert result["rpo_writes_lost"] == max(0, result["acknowledged"] - on_c), (result, on_c)
    assert check.returncode == (3 if result["rpo_writes_lost"] else 0)


def test_old_primary_killed_during_its_rollback_resumes_and_converges(topology):
    """kill -9 of the returning old primary in the middle of the resync that rolls its
    divergent writes back: it restarts inconsistent, the resync resumes, nothing is lost."""
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 64 * MiB},
                    group_options={"resync_rate": "16MiB"})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 64M")
    _converged(topo, "a", ["b"])
    b.kill()
    qemu_io(a.nbd_uri("data"), "write -P 0x66 0 32M")  # a lot that never reaches b
    a.kill()
    b.start()
    rc, _ = replicator_cli(b, "promote", "db", "--target", "a:async")
    assert rc == 0
    a.start()
    rc, _ = replicator_cli(a, "demote", "db", "--source", "b")  # the operator's act
    assert rc == 0
    wait_until(lambda: (b.target("db", "a")["resync"] or {}).get("done_bytes", 0) > 4 * MiB,
               60, "rollback resync under way")
    a.kill()
    a.start()
    assert a.group("db")["inconsistent"] is True  # restarted mid-resync, knows it
    wait_until(lambda: b.target("db", "a")["state"] == "replicating", 120, "b -> a again")
    _converged(topo, "b", ["a"])
    assert _identical(topo, ["b", "a"])
    assert len(a.group("db")["discarded"]) == 1  # saved once, before anything was overwritten
