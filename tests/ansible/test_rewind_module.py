"""replicator_rewind against real agents on loopback: a copy at a marker of a retaining
replica, idempotent for the same point, refused for another, check mode, removal."""

import json
import os

import pytest

from tests.agents import MiB, Topology, replicator_cli
from tests.ansible.ansible_harness import CLI, run_module
from tests.clients import qemu_io


@pytest.fixture
def retaining(tmp_path):
    topo = Topology(tmp_path, ["a", "b"], [("a", "b", "async")], volumes={"data": 8 * MiB},
                    journal_size="256MiB", node_options={"b": {"retain": "64MiB"}})
    try:
        yield topo.start()
    finally:
        topo.stop()


def test_rewind_copy_at_a_marker(retaining, tmp_path):
    a, b = retaining["a"], retaining["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    rc, m = replicator_cli(a, "mark", "db", "good")
    assert rc == 0, m
    qemu_io(a.nbd_uri("data"), "write -P 0x66 0 1M")  # the corruption
    retaining.wait_converged()
    copy = str(tmp_path / "copy")
    args = {"cli": CLI, "config": b.config_path, "group": "db", "to": "good", "copy": copy}

    res = run_module("replicator_rewind", {**args, "_ansible_diff": True}, check_mode=True)
    assert res["changed"] and not os.path.exists(copy), res
    assert res["diff"]["after"] == {"copy": copy, "to": "good"}

    res = run_module("replicator_rewind", args)
    assert res["changed"] and res["snapshot"]["seq"] == m["seq"], res
    with open(res["snapshot"]["volumes"]["data"]["path"], "rb") as f:
        assert f.read(1 << 20) == b"\x11" * (1 << 20)  # before the corruption

    again = run_module("replicator_rewind", {**args, "to": f"seq:{m['seq']}"})
    assert not again["changed"] and again["snapshot"]["seq"] == m["seq"], again
    other = run_module("replicator_rewind", {**args, "to": "-1s"})
    assert other["failed"] and "remove it first (state=absent)" in other["msg"], other

    gone = {"cli": CLI, "config": b.config_path, "group": "db", "copy": copy, "state": "absent"}
    assert run_module("replicator_rewind", gone, check_mode=True)["changed"] and os.path.exists(copy)
    res = run_module("replicator_rewind", gone)
    assert res["changed"] and not os.path.exists(copy), res
    assert not run_module("replicator_rewind", gone)["changed"]


def test_rewind_refuses_a_directory_of_another_group_or_not_a_copy(retaining, tmp_path):
    b = retaining["b"]
    copy = tmp_path / "other"
    copy.mkdir()
    (copy / "snapshot.json").write_text(json.dumps({"group": "web", "seq": 1}))
    args = {"cli": CLI, "config": b.config_path, "group": "db", "to": "1", "copy": str(copy)}
    res = run_module("replicator_rewind", args)
    assert res["failed"] and "holds a copy of group 'web'" in res["msg"], res
    (copy / "snapshot.json").write_text("{")
    res = run_module("replicator_rewind", args)
    assert res["failed"] and "is not a copy's manifest" in res["msg"], res
    res = run_module("replicator_rewind", {**args, "copy": str(tmp_path / "new"), "to": "nope"})
    assert res["failed"] and "nope" in res["msg"], res  # the agent's own refusal
