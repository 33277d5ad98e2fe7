"""The operation modules against real agents on loopback (tests/agents.py): status,
wait, pair, resync and verify, in normal and check mode."""

import threading

import pytest

from tests.agents import MiB, Topology, wait_until
from tests.ansible.ansible_harness import CLI, run_module
from tests.clients import qemu_io


@pytest.fixture
def cascade(tmp_path):
    topo = Topology(tmp_path, ["a", "b", "c"], [("a", "b", "sync"), ("b", "c", "async", "zstd")],
                    volumes={"data": 8 * MiB}, tls=True)
    try:
        yield topo.start()
    finally:
        topo.stop()


def args(topo, node, **kw):
    return {"cli": CLI, "config": topo[node].config_path, **kw}


def test_status_and_wait(cascade):
    cascade.wait_converged()  # agents answer before their links connect; now they have
    res = run_module("replicator_wait", args(cascade, "a", timeout=20))
    assert res["done"] and not res.get("failed"), res
    assert res["lines"] == ["db a -> b sync: replicating seq 0 acked 0 lag 0 rec/0B/0.0s"]
    assert res["watched"] == "none"  # replicating at once: nothing to wait for
    qemu_io(cascade["a"].nbd_uri("data"), "write -P 0x5a 0 1M")
    res = run_module("replicator_status", args(cascade, "b"), check_mode=True)
    assert not res["changed"] and res["status"]["node"] == "b"
    (lk,) = res["links"]
    assert (lk["source"], lk["target"], lk["mode"], lk["compress"]) == ("b", "c", "async", "zstd")
    res = run_module("replicator_status", args(cascade, "a", targets=["c"]))
    assert res["failed"] and "does not ship any group to c" in res["msg"]


def test_wait_reports_not_done_within_its_timeout(cascade):
    cascade["c"].kill()
    wait_until(lambda: cascade["b"].target("db", "c")["state"] != "replicating", 20, "c to drop")
    res = run_module("replicator_wait", args(cascade, "b", timeout=0.5))
    # (what it watched depends on the machine: on a loaded one the timeout can pass before
    # the event stream is open; test_wait_returns_when_the_link_is_back covers that part)
    assert not res.get("failed") and res["done"] is False, res
    assert res["links"][0]["state"] != "replicating"


@pytest.mark.parametrize("follow_events, watched", [(True, "events"), (False, "polling")])
def test_wait_returns_when_the_link_is_back(cascade, follow_events, watched):
    """It follows the agent's event stream from status's event_seq (or polls the status)
    and returns once the link to the restarted target replicates again."""
    cascade["c"].kill()
    wait_until(lambda: cascade["b"].target("db", "c")["state"] != "replicating", 20, "c to drop")
    restart = threading.Timer(0.5, cascade["c"].start, kwargs={"wait": False})
    restart.start()
    try:
        res = run_module("replicator_wait", args(cascade, "b", timeout=30,
                                                 follow_events=follow_events))
    finally:
        restart.join()
    assert res["done"] and not res.get("failed"), res
    assert res["watched"] == watched and res["links"][0]["state"] == "replicating"


def test_pair_leaves_replicating_links_alone(cascade):
    res = run_module("replicator_pair", args(cascade, "a", initial_sync="full"))
    assert not res.get("failed") and not res["changed"] and res["started"] == []


def test_resync_rate_is_applied_once(cascade):
    first = run_module("replicator_resync", args(cascade, "a", rate="40MiB"))
    assert first["changed"] and first["results"][0]["rate_limit_bytes_per_s"] == 40 * MiB, first
    again = run_module("replicator_resync", args(cascade, "a", rate="40MiB"))
    assert not again["changed"], again
    check = run_module("replicator_resync", args(cascade, "a", rate="1MiB"), check_mode=True)
    assert check["changed"] and check["results"][0]["rate_limit_bytes_per_s"] == 40 * MiB


def test_full_resync_returns_to_replicating(cascade):
    qemu_io(cascade["a"].nbd_uri("data"), "write -P 0x11 0 4M")
    res = run_module("replicator_resync", args(cascade, "a", mode="full"))
    assert res["changed"] and not res.get("failed"), res
    wait = run_module("replicator_wait", args(cascade, "a", timeout=60))
    assert wait["done"], wait
    cascade.wait_converged()
    cascade.assert_identical()


def test_verify_finds_and_repairs_a_corrupted_region(cascade):
    qemu_io(cascade["a"].nbd_uri("data"), "write -P 0x42 0 8M")
    cascade.wait_converged()
    clean = run_module("replicator_verify", args(cascade, "a"))
    assert not clean.get("failed") and clean["mismatches"] == 0, clean
    with open(cascade["b"].volume_path("db", "data"), "r+b") as f:
        f.seek(3 * MiB + 100)
        f.write(b"corrupt")
    found = run_module("replicator_verify", args(cascade, "a", repair=True), check_mode=True)
    assert found["mismatches"] == 1 and found["changed"], found
    (m,) = found["results"][0]["mismatches"]
    assert m["volume"] == "data" and m["offset"] <= 3 * MiB + 100 < m["offset"] + m["length"]
    assert "  data offset" in found["lines"][1]
    repaired = run_module("replicator_verify", args(cascade, "a", repair=True))
    assert repaired["changed"], repaired
    again = run_module("replicator_verify", args(cascade, "a"))
    assert again["mismatches"] == 0, again
    cascade.assert_identical(["a", "b"])
