"""The replicator_mark module against real agents on loopback: a marker on the primary
(once: a second run finds it), nothing on a replica, the list on both, check mode."""

import pytest

from tests.agents import Topology, wait_until
from tests.ansible.ansible_harness import CLI, run_module


@pytest.fixture
def pair(tmp_path):
    topo = Topology(tmp_path, ["a", "b"], [("a", "b", "async")])
    try:
        yield topo.start()
    finally:
        topo.stop()


def args(topo, node, **kw):
    return {"cli": CLI, "config": topo[node].config_path, "group": "db", **kw}


def test_mark_once_on_the_primary_and_list_it_everywhere(pair, tmp_path):
    check = run_module("replicator_mark", args(pair, "a", name="m1"), check_mode=True)
    assert check["changed"] and check["markers"] == []
    log = tmp_path / "hooks.log"
    first = run_module("replicator_mark", args(pair, "a", name="m1", freeze=f"echo f >> {log}",
                                               thaw=f"echo t >> {log}"))
    assert first["changed"] and first["marker"]["consistent"], first
    assert log.read_text().split() == ["f", "t"]
    again = run_module("replicator_mark", args(pair, "a", name="m1"))
    assert not again["changed"] and again["marker"]["seq"] == first["marker"]["seq"]
    replica = run_module("replicator_mark", args(pair, "b", name="m2"))
    assert not replica["changed"] and "secondary" in replica["skipped"]
    wait_until(lambda: run_module("replicator_mark", args(pair, "b", state="listed"))["markers"],
               30, "the marker on b")
    (m,) = run_module("replicator_mark", args(pair, "b", state="listed"))["markers"]
    assert (m["name"], m["seq"]) == ("m1", first["marker"]["seq"])
    bad = run_module("replicator_mark", args(pair, "a", name="m3", freeze="true"))
    assert bad["failed"] and "thaw" in bad["msg"]
