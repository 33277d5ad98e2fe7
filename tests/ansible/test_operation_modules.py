"""The operation modules (promote, demote, switchover, failback, restore, resolve, attach,
reparent, rollback) against real agents on loopback (tests/agents.py): each in normal
mode, in check mode (the agents' state is the same after), with its diff, run twice (the
second run changes nothing) and refused where the agent would refuse. And every module
of the collection as ansible-doc shows it: its options are its argument_spec."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.agents import MiB, Topology, wait_until
from tests.ansible.ansible_harness import CLI, ROOT, library_module, module_utils, run_module
from tests.clients import qemu_io

MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "plugins", "modules"))
                 if f.endswith(".py"))


@pytest.fixture
def topology(tmp_path):
    made = []

    def make(*args, **kwargs):
        topo = Topology(tmp_path, *args, **kwargs)
        made.append(topo)
        return topo.start()

    try:
        yield make
    finally:
        for topo in made:
            topo.stop()


def op(topo, node, module, check=False, **params):
    """Module replicator_MODULE on `node` with --diff (and --check)."""
    return run_module(f"replicator_{module}", {"cli": CLI, "config": topo[node].config_path,
                                             "group": "db", "_ansible_diff": True, **params},
                      check_mode=check)


def group_state(topo, node):
    """What an operation may change of group db on `node`."""
    g = topo[node].group("db")
    return (g["role"], g["role_from"], g["source"], g["generation"], g["inconsistent"],
            sorted((t["node"], t["mode"]) for t in g["targets"]))


def checked(topo, node, name, **params):
    """The module in check mode: says it would change something, changes nothing."""
    before = {n: group_state(topo, n) for n in topo.agents if topo[n].proc is not None}
    res = op(topo, node, name, check=True, **params)
    assert res["changed"] and not res.get("failed") and res["result"] is None, res
    assert {n: group_state(topo, n) for n in before} == before
    assert res["diff"]["before"] != res["diff"]["after"]
    return res


def ok(res):
    assert not res.get("failed"), res
    return res


def twice(topo, node, name, **params):
    """The module run for real, then again: the second run changes nothing."""
    first = ok(op(topo, node, name, **params))
    assert first["changed"] and first["result"] is not None, first
    assert first["diff"]["after"] == first["state"]
    again = ok(op(topo, node, name, **params))
    assert not again["changed"] and again["result"] is None, again
    assert again["diff"]["before"] == again["diff"]["after"] == again["state"]
    return first


def refused(res, *words):
    assert res.get("failed") and not res.get("changed"), res
    for word in words:
        assert word in res["msg"], res["msg"]
    return res


def playbook(topo, tmp_path, name, *extra, ok=True):
    """ansible-playbook playbooks/NAME from the checkout against the topology's agents:
    an inventory of local hosts whose install and config directories are theirs."""
    install = tmp_path / "install"
    if not install.exists():
        install.mkdir()
        (install / "venv").symlink_to(os.path.dirname(os.path.dirname(CLI)))
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"replicator": {"hosts": {
        n: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "replicator_agent_install_dir": str(install),
            "replicator_agent_config_dir": topo[n].dir,
            "replicator_groups": [{"name": "db"}]} for n in topo.agents}}}}}))
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
                          "-i", str(inventory), f"playbooks/{name}", *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (run.returncode == 0) == ok, run.stdout[-4000:] + run.stderr[-2000:]
    return run.stdout


def replicating(topo, source, target):
    wait_until(lambda: topo[source].target("db", target)["state"] == "replicating", 60,
               f"{source} -> {target} replicating")


def test_switchover_failback_and_restore(topology, tmp_path):
    topo = topology(["a", "b", "c"], [("a", "b", "sync"), ("a", "c", "async", "zstd")],
                    volumes={"data": 4 * MiB})
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x11 0 1M")
    topo.wait_converged()
    refused(op(topo, "a", "switchover", to="z"), "does not ship to 'z'", "targets: b:sync, c:async:zstd")
    refused(op(topo, "b", "switchover", to="c"), "is secondary on b (source a)",
            "on the primary")
    res = checked(topo, "a", "switchover", to="b")
    assert res["diff"]["before"]["targets"] == ["b:sync", "c:async:zstd"]
    assert res["diff"]["after"] == {**res["diff"]["before"], "role": "secondary",
                                    "role_from": "runtime", "source": "b", "targets": []}
    moved = twice(topo, "a", "switchover", to="b", timeout=30)
    refused(op(topo, "a", "restore"), "fail back (or switch over) first")
    assert (moved["result"]["from"], moved["result"]["to"]) == ("a", "b")
    assert moved["diff"]["after"]["role"] == "secondary" and moved["links"] == []
    assert group_state(topo, "b")[0] == "primary" and topo["c"].group("db")["source"] == "b"
    # c heard of b in the stream: reparenting it to b is done already
    res = ok(op(topo, "c", "reparent", source="b"))
    assert not res["changed"] and res["state"]["source"] == "b"
    refused(op(topo, "b", "reparent", source="a"), "is primary on b: it has no source")

    replicating(topo, "b", "a")
    refused(op(topo, "c", "failback", to="a"), "is secondary on c (source b)")
    checked(topo, "b", "failback", to="a")
    back = twice(topo, "b", "failback", to="a", rejoin_timeout=60)
    assert back["result"]["to"] == "a" and back["diff"]["after"]["source"] == "a"
    assert group_state(topo, "a")[0] == "primary"

    # every member back to its configured links (a: b sync again, c async with zstd)
    res = checked(topo, "a", "restore")
    assert res["diff"]["after"]["role_from"] == "config"
    for node in ("a", "b", "c"):
        twice(topo, node, "restore")
    assert topo["a"].group("db")["role_from"] == "config"
    assert {t["node"]: (t["mode"], t["compress"]) for t in topo["a"].group("db")["targets"]} \
        == {"b": ("sync", "none"), "c": ("async", "zstd")}
    topo.wait_converged()
    topo.assert_identical()

    # no split brain: resolving would demote a healthy primary
    refused(op(topo, "a", "resolve", survivor="b", discard_local=True),
            "in no split brain on a (it is primary)", "nothing to resolve")
    refused(op(topo, "a", "resolve", survivor="b"), "discard_local true")
    res = ok(op(topo, "b", "resolve", survivor="a", discard_local=True))
    assert not res["changed"]  # b follows a: there is nothing to resolve

    # the playbook, on every host with the inventory's directories; again: nothing to do
    out = playbook(topo, tmp_path, "switchover.yml", "-e", "replicator_switchover_to=b")
    assert group_state(topo, "b")[0] == "primary" and "to: b" in out, out
    out = playbook(topo, tmp_path, "switchover.yml", "-e", "replicator_switchover_to=b")
    assert "changed=0" in out and "changed=1" not in out


def test_takeover_attach_demote_and_a_drill_copy(topology, tmp_path):
    topo = topology(["a", "b", "c"], [("a", "b", "async"), ("b", "c", "async")],
                    volumes={"data": 4 * MiB})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    topo.wait_converged()
    refused(op(topo, "b", "promote"), "its source a is still connected", "(or force)")
    refused(op(topo, "b", "promote", at="1"), "still connected")
    refused(op(topo, "b", "promote", check=True, targets=["a:bogus"]), "expected NODE")
    refused(op(topo, "b", "promote", copy=str(tmp_path / "x"), targets=["a"]),
            "mutually exclusive")

    # the drill: a copy of the replica, which goes on replicating
    drill = tmp_path / "drill"
    res = op(topo, "c", "promote", check=True, copy=str(drill))
    assert res["changed"] and not os.path.exists(drill) and res["diff"]["after"] == \
        res["diff"]["before"]
    res = ok(op(topo, "c", "promote", copy=str(drill)))
    assert res["changed"] and res["result"]["role"] == "copy" and (drill / "data.img").exists()
    assert res["state"]["role"] == "secondary"
    refused(op(topo, "c", "promote", copy=str(drill)), "not empty")
    refused(op(topo, "a", "promote", copy=str(tmp_path / "y")), "only a secondary's copy")

    a.kill()  # the primary's site is lost
    wait_until(lambda: b.group("db")["upstream"] is None, 20, "b to lose its source")
    res = checked(topo, "b", "promote", targets=["a:async"])
    assert res["diff"]["after"]["role"] == "primary" and res["diff"]["after"]["targets"] == \
        ["a:async", "c:async"]
    took = twice(topo, "b", "promote", targets=["a:async"], no_bunker=True)
    assert took["result"]["generation"] == took["state"]["generation"] != \
        took["diff"]["before"]["generation"]
    refused(op(topo, "b", "promote", targets=["a:sync"]),
            "is primary on b already", "not a:sync", "replicator_attach")

    # a comes back believing it is primary: it follows b
    a.start()
    refused(op(topo, "a", "demote", source="zz"), "one of this node's peers (got 'zz')")
    res = checked(topo, "a", "demote", source="b")
    assert res["diff"]["after"]["targets"] == [] and res["diff"]["after"]["source"] == "b"
    twice(topo, "a", "demote", source="b")
    replicating(topo, "b", "a")
    refused(op(topo, "c", "reparent", source="zz"), "one of this node's peers (got 'zz')")

    # c is re-pointed to a (a cascade below the old primary), b to ship to it no more
    res = checked(topo, "c", "reparent", source="a")
    assert res["diff"]["after"]["source"] == "a"
    twice(topo, "c", "reparent", source="a")
    res = checked(topo, "a", "attach", target="c:async:zstd")
    assert res["diff"]["after"]["targets"] == ["c:async:zstd"]
    twice(topo, "a", "attach", target="c:async:zstd")
    res = ok(op(topo, "a", "attach", target="c"))  # there already, as c:async:zstd
    assert not res["changed"] and "as c:async:zstd, not c:async" in json.dumps(res["warnings"])
    refused(op(topo, "a", "attach", target="c:periodic"), "expected NODE")
    wait_until(lambda: a.target("db", "c")["state"] == "replicating", 60, "a -> c")
    # and back below b, which still lists it as a target
    out = playbook(topo, tmp_path, "reparent.yml", "-e", "replicator_reparent_node=c",
                   "-e", "replicator_reparent_source=b")
    assert "db b -> c async: replicating" in out and topo["c"].group("db")["source"] == "b"


def test_rollback_of_an_interrupted_resync(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 8 * MiB},
                    heartbeat_timeout=1.5, group_options={"resync_rate": "1MiB"})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 8M")
    topo.wait_converged(120)
    res = ok(op(topo, "b", "rollback"))
    assert not res["changed"]  # consistent: nothing to roll back
    ok(run_module("replicator_resync", {"cli": CLI, "config": a.config_path, "mode": "full"}))
    wait_until(lambda: b.group("db")["inconsistent"], 30, "b being resynced")
    refused(op(topo, "b", "rollback"), "the source a is still connected", "or force")
    refused(op(topo, "b", "rollback", check=True), "still connected")
    a.kill()  # the source is lost mid-resync
    wait_until(lambda: b.group("db")["upstream"] is None, 20, "b to lose its source")
    refused(op(topo, "b", "promote"), "is inconsistent on b", "replicator_rollback")
    res = checked(topo, "b", "rollback")
    assert res["diff"]["before"]["inconsistent"] and not res["diff"]["after"]["inconsistent"]
    out = playbook(topo, tmp_path, "rollback.yml", "-e", "replicator_rollback_node=b", ok=False)
    assert "re-run with -e replicator_safe_mode=false" in out and b.group("db")["inconsistent"]
    out = playbook(topo, tmp_path, "rollback.yml", "-e", "replicator_rollback_node=b",
                   "-e", "replicator_safe_mode=false")
    assert "region(s) restored; consistent at seq" in out
    assert b.group("db")["inconsistent"] is False
    res = ok(op(topo, "b", "rollback"))
    assert not res["changed"]


def test_resolve_a_split_brain_on_the_loser(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 4 * MiB})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    topo.wait_converged()
    good = {n: topo[n].config["peers"][p] for n, p in (("a", "b"), ("b", "a"))}

    def peers(address):
        for n, p in (("a", "b"), ("b", "a")):
            topo[n].stop()
            topo[n].config["peers"][p] = address.get(n, "127.0.0.1:9")
            topo[n].save_config()
            topo[n].start()

    peers({})  # cut off from each other, both primary, both write
    ok(op(topo, "b", "promote", targets=["a:async"]))
    ok(op(topo, "a", "demote", source="b"))
    ok(op(topo, "a", "promote", targets=["b:async"]))
    qemu_io(a.nbd_uri("data"), "write -P 0xaa 0 64k")
    qemu_io(b.nbd_uri("data"), "write -P 0xbb 2M 64k")
    peers(good)  # the network heals
    wait_until(lambda: a.group("db")["split_brain"], 30, "a: split brain")
    refused(op(topo, "a", "resolve", survivor="b", discard_local=False), "discard_local true")
    res = checked(topo, "a", "resolve", survivor="b", discard_local=True)
    assert res["diff"]["before"]["split_brain"] == "b"
    assert res["diff"]["after"] == {**res["diff"]["before"], "role": "secondary", "source": "b",
                                    "role_from": "runtime", "split_brain": None, "targets": []}
    resolve = ["-e", "replicator_resolve_node=a", "-e", "replicator_resolve_survivor=b"]
    out = playbook(topo, tmp_path, "resolve.yml", *resolve, ok=False)
    assert "re-run with -e replicator_safe_mode=false" in out and a.group("db")["split_brain"]
    out = playbook(topo, tmp_path, "resolve.yml", *resolve, "-e", "replicator_safe_mode=false")
    assert b.target("db", "a")["state"] == "replicating"  # the playbook waited for it
    (kept,) = a.group("db")["discarded"]
    assert os.path.isfile(os.path.join(kept, "index.json")) and f"is kept in {kept}" in out
    res = ok(op(topo, "a", "resolve", survivor="b", discard_local=True))
    assert not res["changed"] and res["state"]["source"] == "b"
    topo.primary = "b"
    topo.wait_converged()
    topo.assert_identical()


def _argument_spec(name: str) -> dict:
    """The argument_spec module NAME gives AnsibleModule (its main() stopped there)."""
    mod = library_module(name)

    class Stop(Exception):
        pass

    def capture(argument_spec, **_):
        raise Stop(argument_spec)

    real = mod.AnsibleModule
    mod.AnsibleModule = capture
    try:
        mod.main()
    except Stop as stop:
        return stop.args[0]
    finally:
        mod.AnsibleModule = real
    raise AssertionError(f"{name}: main() made no AnsibleModule")


def test_every_module_is_shown_by_ansible_doc_as_it_is():
    """ansible-doc (from the checkout, with its ansible.cfg) renders every module's
    DOCUMENTATION, EXAMPLES and RETURN, and the options it documents are the module's
    argument_spec: names, types, defaults, choices, required, elements."""
    doc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-doc"),
                          "--json", "-t", "module",
                          *(f"voltrail.replicator.{m}" for m in MODULES)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert doc.returncode == 0 and not doc.stderr.strip(), doc.stderr
    shown = json.loads(doc.stdout)
    assert sorted(shown) == [f"voltrail.replicator.{m}" for m in MODULES]
    for name in MODULES:
        entry = shown[f"voltrail.replicator.{name}"]
        assert entry["doc"]["short_description"] and entry["doc"]["description"], name
        assert entry["doc"]["version_added"] == "0.1.0" and entry["doc"]["author"], name
        assert entry["examples"].strip() and entry["return"], name
        for task in yaml.safe_load(entry["examples"]):
            assert f"voltrail.replicator.{name}" in task, (name, task)
        options, spec = entry["doc"]["options"], _argument_spec(name)
        assert sorted(options) == sorted(spec), name
        for option, want in spec.items():
            got = options[option]
            assert (got.get("type", "str"), got.get("default"), got.get("choices"),
                    bool(got.get("required")), got.get("elements")) == \
                (want.get("type", "str"), want.get("default"), want.get("choices"),
                 bool(want.get("required")), want.get("elements")), (name, option)


def test_target_specs_compare_as_the_agent_reads_them():
    helpers = module_utils("replicator_agent")
    assert helpers.canonical_spec("b") == "b:async"
    assert helpers.canonical_spec("b:async:block:zstd") == "b:async:zstd:block"
    assert helpers.canonical_spec("v:periodic=1m:zstd") == "v:periodic=60s:zstd"
    assert helpers.canonical_spec("v:periodic=1d") == "v:periodic=86400s"
    assert helpers.target_spec({"node": "v", "mode": "periodic", "interval": 60.0,
                                "compress": "zstd", "on_disconnect": "continue"}) == \
        "v:periodic=60s:zstd"
    assert helpers.target_spec({"node": "k", "mode": "sync", "compress": "none", "bunker": True,
                                "on_disconnect": "block"}) == "k:sync:bunker:block"
    for bad in (":async", "b:fast", "b:periodic", "b:sync=5s", "b:async:zstd:zstd", "b:async:gzip"):
        with pytest.raises(helpers.AgentError, match="expected NODE"):
            helpers.canonical_spec(bad)


def test_the_link_modules_show_what_they_change_as_a_diff(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 4 * MiB})
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x42 0 4M")
    topo.wait_converged()
    link = "db -> b"
    res = ok(op(topo, "a", "pair"))
    assert not res["changed"] and res["diff"]["before"] == res["diff"]["after"] == \
        {link: {"state": "replicating", "resync": None}}
    res = ok(op(topo, "a", "pair", check=True, initial_sync="checksum"))
    assert not res["changed"]  # no initial sync pending: nothing to change

    res = ok(op(topo, "a", "resync", check=True, rate="2MiB"))
    assert res["changed"] and res["diff"]["after"][link]["rate_limit_bytes_per_s"] == 2 * MiB
    res = ok(op(topo, "a", "resync", rate="2MiB"))
    assert res["diff"]["before"][link]["rate_limit_bytes_per_s"] != 2 * MiB
    assert res["diff"]["after"][link] == {"state": "replicating", "rate_limit_bytes_per_s": 2 * MiB}

    with open(b.volume_path("db", "data"), "r+b") as f:
        f.seek(MiB)
        f.write(b"corrupt")
    res = ok(op(topo, "a", "verify", check=True, repair=True))
    assert res["changed"] and res["diff"] == {"before": {link: 1}, "after": {link: 0}}
    res = ok(op(topo, "a", "verify", repair=True))
    assert res["changed"] and res["diff"] == {"before": {link: 1}, "after": {link: 0}}

    res = ok(op(topo, "a", "mark", check=True, name="m1"))
    assert res["changed"] and res["diff"] == {"before": {"markers": []},
                                              "after": {"markers": ["m1"]}}
    assert ok(op(topo, "a", "mark", name="m1"))["diff"]["after"] == {"markers": ["m1"]}
    res = ok(op(topo, "a", "mark", name="m1"))
    assert not res["changed"] and "diff" not in res  # there already: nothing to show
