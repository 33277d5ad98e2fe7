"""Online verify: in-band with the write stream, so a running workload shows no false
mismatch; a corrupted replica region is reported exactly and `--repair` fixes it."""

import subprocess

import pytest

from tests.agents import MiB, kinds, replicator_cli, wait_until
from tests.clients import qemu_io

GRAN = 64 << 10


def _replicating(topo, source="a", target="b"):
    wait_until(lambda: topo[source].target("db", target)["state"] == "replicating", 30,
               f"{source} -> {target} replicating")


def test_corrupt_region_is_reported_exactly_and_repaired(topology):
    topo = topology(["a", "b"], [("a", "b", "sync")])
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x11 0 16M")
    qemu_io(topo["a"].nbd_uri("log"), "write -P 0x22 0 4M")
    topo.wait_converged()
    _replicating(topo)
    rc, clean = replicator_cli(topo["a"], "verify", "db", "b")
    assert rc == 0, clean
    assert clean["mismatches"] == [] and clean["bytes_checked"] == 20 * MiB
    assert clean["regions_checked"] == 20 * MiB // GRAN

    # Flip bytes behind the agent's back: in one region of `data`, across the boundary
    # of two regions of `log`.
    with open(topo["b"].volume_path("db", "data"), "r+b") as f:
        f.seek(3 * MiB + 100)
        f.write(b"corrupt!")
    with open(topo["b"].volume_path("db", "log"), "r+b") as f:
        f.seek(2 * GRAN - 3)
        f.write(b"xxxxxx")
    rc, found = replicator_cli(topo["a"], "verify", "db", "b")
    assert rc == 3, found
    assert found["mismatches"] == [
        {"volume": "data", "offset": 3 * MiB, "length": GRAN},
        {"volume": "log", "offset": GRAN, "length": GRAN},
        {"volume": "log", "offset": 2 * GRAN, "length": GRAN},
    ]
    # A range: only the regions it overlaps are checked.
    rc, ranged = replicator_cli(topo["a"], "verify", "db", "b", "--volume", "data",
                                "--offset", "3MiB", "--length", "1")
    assert rc == 3 and ranged["regions_checked"] == 1 and len(ranged["mismatches"]) == 1
    # Each verify is an event with its result (and the metric of the last one).
    assert [e["mismatches"] for e in kinds(topo["a"], "verify")] == [0, 3, 1]

    sent_before = topo["a"].target("db", "b")["bytes_sent"]
    rc, repaired = replicator_cli(topo["a"], "verify", "db", "b", "--repair")
    assert rc == 3 and repaired["repaired"] == 3 and repaired["repaired_bytes"] == 3 * GRAN
    _replicating(topo)
    rc, after = replicator_cli(topo["a"], "verify", "db", "b")
    assert rc == 0 and after["mismatches"] == []
    topo.assert_identical()
    # The three regions were resent, and nothing else.
    assert topo["a"].target("db", "b")["bytes_sent"] - sent_before == 3 * GRAN


@pytest.mark.parametrize("first_hop", ["async", "sync"])  # sync: batches also ship early
def test_verify_under_a_running_workload_reports_no_mismatch(topology, first_hop):
    topo = topology(["a", "b", "c"], [("a", "b", first_hop), ("b", "c", "async")],
                    volumes={"data": 32 * MiB})
    topo.wait_converged()
    _replicating(topo)
    _replicating(topo, "b", "c")
    fio = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={topo['a'].nbd_uri('data')}",
         "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=32M", "--runtime=60",
         "--time_based"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        start = topo["a"].group("db")["seq"]
        wait_until(lambda: topo["a"].group("db")["seq"] > start + 500, 30, "fio writing")
        for source, target in (("a", "b"), ("a", "b"), ("b", "c")):
            before = topo["a"].group("db")["seq"]
            rc, result = replicator_cli(topo[source], "verify", "db", target)
            assert rc == 0, result
            assert result["bytes_checked"] == 32 * MiB
            assert topo["a"].group("db")["seq"] > before  # writes went on meanwhile
        assert fio.poll() is None, "the workload stopped during the verify"
    finally:
        fio.terminate()
        fio.wait(30)
    topo.wait_converged()
    topo.assert_identical()


def test_verify_of_a_target_that_is_not_replicating_is_refused(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    topo["b"].kill()
    rc, err = replicator_cli(topo["a"], "verify", "db", "b")
    assert rc == 1 and err["ok"] is False and "needs a target that is replicating" in err["error"]
    rc, err = replicator_cli(topo["a"], "verify", "db", "nope")
    assert rc == 1 and "does not ship to 'nope'" in err["error"]
    rc, err = replicator_cli(topo["a"], "verify", "db", "b", "--volume", "nope")
    assert rc == 1 and "no volume 'nope'" in err["error"]
