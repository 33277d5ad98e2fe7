"""`replicator reload` and SIGHUP: a config's live changes (targets, modes, rates, peers)
taken by the running agent without cutting its NBD clients; a change that needs a
restart, an invalid file, a dry run change nothing."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from replicator import admin
from replicator.drill.nbd_client import NbdClient, NbdError
from tests.agents import kinds, replicator_cli, wait_until
from tests.integration.test_periodic import CounterWriter

pytestmark = pytest.mark.integration

BLOCKS = 256


def three_nodes(topology):
    """a ships to b (sync); c is a secondary of a that a does not know of yet (not in
    its peers, not its target)."""
    topo = topology(["a", "b", "c"], [("a", "b", "sync")],
                    node_options={"c": {"role": "secondary", "source": "a"}}, start=False)
    del topo["a"].config["peers"]["c"]
    topo["a"].save_config()
    return topo.start()


def target_modes(agent) -> dict:
    return {t["node"]: t["mode"] for t in agent.group("db")["targets"]}


@pytest.mark.parametrize("how", ["cli", "sighup"])
def test_reload_adds_a_target_and_changes_a_mode_and_rate_under_a_writing_client(topology, how):
    topo = three_nodes(topology)
    a = topo["a"]
    wait_until(lambda: a.target("db", "b")["state"] == "replicating", 30, "b to replicate")
    pid = a.status()["pid"]
    with CounterWriter(a, "data", BLOCKS) as writer:
        wait_until(lambda: writer.written > 50, 30, "the client to write")
        a.config["peers"]["c"] = topo["c"].config["listen"]
        g = a.config["groups"][0]
        g["targets"] = [{"node": "b", "mode": "async"}, {"node": "c", "mode": "async"}]
        g["resync_rate"] = "64MiB"
        a.save_config()
        if how == "cli":
            code, out = replicator_cli(a, "reload")
            assert code == 0, out
            assert out["reloaded"] and not out["dry_run"] and out["restart_required"] == []
            assert sorted(c["key"] for c in out["changes"]) == [
                "groups[db].resync_rate", "groups[db].targets[b].mode",
                "groups[db].targets[c]", "peers[c]"]
        else:
            a.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: target_modes(a) == {"b": "async", "c": "async"}, 30,
                   lambda: f"the reloaded targets (now {target_modes(a)})")
        before = writer.written
        wait_until(lambda: a.target("db", "c")["state"] == "replicating", 60,
                   lambda: f"c to replicate ({a.target('db', 'c')})")
        wait_until(lambda: writer.written > before + 50, 30, "the client to go on writing")
        # One connection all along: the writer never reconnects, so had the agent cut it,
        # the writer would have failed (it is checked as the block ends).
        assert a.status()["nbd"]["per_export"] == {"data": 1}
    topo.wait_converged()
    topo.assert_identical()
    st = a.status()
    assert st["pid"] == pid
    assert {t["node"]: t["state"] for t in st["groups"][0]["targets"]} == \
        {"b": "replicating", "c": "replicating"}
    (event,) = kinds(a, "config_reloaded")
    assert {c["key"] for c in event["changes"]} >= {"groups[db].targets[c]", "peers[c]"}
    code, out = replicator_cli(a, "reload")  # the file and the agent agree now
    assert (code, out["changes"], out["reloaded"]) == (0, [], True)


def test_restart_only_change_and_dry_run_apply_nothing(topology):
    topo = topology(["a", "b"], [("a", "b", "sync")])
    a = topo["a"]
    wait_until(lambda: a.target("db", "b")["state"] == "replicating", 30, "b to replicate")
    pid = a.status()["pid"]
    a.config["groups"][0]["targets"][0]["mode"] = "async"
    a.save_config()

    code, out = replicator_cli(a, "reload", "--dry-run")
    assert code == 0, out
    assert out == {"reloaded": False, "dry_run": True, "restart_required": [], "errors": [],
                   "changes": [{"key": "groups[db].targets[b].mode", "from": "sync",
                                "to": "async"}]}
    human = subprocess.run([sys.executable, "-m", "replicator.cli", "reload", "--dry-run",
                            "-c", a.config_path], capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and "would apply, live:" in human.stdout
    assert 'groups[db].targets[b].mode: "sync" -> "async"' in human.stdout
    assert target_modes(a) == {"b": "sync"}

    # Another file (the role's check mode: the config as it would be written): a dry run
    # of it says what reloading it would do; a reload re-reads only the agent's own file.
    other = os.path.join(a.dir, "next.yml")
    next_cfg = copy.deepcopy(a.config)
    next_cfg["groups"][0]["targets"][0]["compress"] = "zstd"
    with open(other, "w") as f:
        yaml.safe_dump(next_cfg, f)

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "replicator.cli", "reload", "--json", "-c",
                            other, *args], capture_output=True, text=True, timeout=60)
        return p.returncode, json.loads(p.stdout)
    code, out = cli("--dry-run")
    assert code == 0 and {c["key"] for c in out["changes"]} == {
        "groups[db].targets[b].mode", "groups[db].targets[b].compress"}, out
    code, out = cli()
    assert code == 1 and f"this agent runs with {os.path.realpath(a.config_path)}, not " \
        f"{other}" in out["errors"][0], out
    with pytest.raises(admin.AdminError, match="config must be a file's path; got 7"):
        admin.request(a.config["admin_socket"], "reload", dry_run=True, config=7)
    assert target_modes(a) == {"b": "sync"}

    a.config["groups"][0]["journal_size"] = "128MiB"
    a.config["nbd_listen"] = f"127.0.0.1:{a.nbd_port + 1}"
    a.save_config()
    code, out = replicator_cli(a, "reload")
    assert code == 3, out
    assert not out["reloaded"] and out["restart_required"] == ["groups[db].journal_size",
                                                               "nbd_listen"]
    assert "groups[db].targets[b].mode" in {c["key"] for c in out["changes"]}
    st = a.status()
    assert st["pid"] == pid and target_modes(a) == {"b": "sync"}
    assert st["groups"][0]["journal"]["capacity_bytes"] == 64 << 20
    (event,) = kinds(a, "config_reload_refused")
    assert event["restart_required"] == ["groups[db].journal_size", "nbd_listen"]
    assert kinds(a, "config_reloaded") == []


def test_invalid_file_changes_nothing_and_an_absent_agent_is_exit_1(topology):
    topo = topology(["a", "b"], [("a", "b", "sync")])
    a = topo["a"]
    pid = a.status()["pid"]
    a.config["groups"][0]["targets"][0]["mode"] = "asnyc"
    a.save_config()
    code, out = replicator_cli(a, "reload")
    assert code == 2, out
    assert not out["reloaded"] and out["changes"] == []
    assert any("groups[0].targets[0].mode: expected one of sync, async, periodic; got 'asnyc'"
               in e for e in out["errors"]), out

    a.proc.send_signal(signal.SIGHUP)  # the agent reads the same file: refused, said

    def kept(kind: str) -> list[dict]:  # (the events command cannot read this file either)
        return [e for e in admin.stream(a.config["admin_socket"], "events")
                if e["kind"] == kind]
    (event,) = wait_until(lambda: kept("config_reload_refused"), 30, "the refusal")
    assert any("asnyc" in e for e in event["errors"]) and event["restart_required"] == []
    assert a.status()["pid"] == pid and target_modes(a) == {"b": "sync"}
    assert kept("config_reloaded") == []

    # Fixed, with the NBD limits and the link timers changed: taken live.
    a.config["groups"][0]["targets"][0]["mode"] = "sync"
    a.config.update(nbd_max_connections_per_export=1, heartbeat_timeout=4, log_level="debug")
    a.save_config()
    code, out = replicator_cli(a, "reload")
    assert code == 0 and out["reloaded"], out
    assert [c["key"] for c in out["changes"]] == [
        "heartbeat_timeout", "log_level", "nbd_max_connections_per_export"]
    wait_until(lambda: a.target("db", "b")["state"] == "replicating", 30,
               "b to replicate again (its shipper reconnected with the new timers)")
    first = NbdClient.connect("127.0.0.1", a.nbd_port, "data")
    try:
        with pytest.raises(NbdError, match="nbd_max_connections_per_export 1"):
            NbdClient.connect("127.0.0.1", a.nbd_port, "data")
    finally:
        first.close()
    assert a.status()["pid"] == pid
    a.stop()
    code, out = replicator_cli(a, "reload")
    assert code == 1, out
    assert not out["reloaded"] and "no agent is listening" in out["errors"][0]
    assert not os.path.exists(a.config["admin_socket"])


def test_targets_set_at_runtime_refuse_a_reload_that_contradicts_them(topology):
    topo = topology(["a", "b", "c"], [("a", "b", "sync")],
                    node_options={"c": {"role": "secondary", "source": "a"}})
    a = topo["a"]
    admin.request(a.config["admin_socket"], "attach", group="db",
                  target={"node": "c", "mode": "async"})
    a.config["groups"][0]["targets"][0]["mode"] = "async"
    a.save_config()
    code, out = replicator_cli(a, "reload")
    assert code == 1, out
    assert "groups[db].targets[b].mode changed, but group db's role and targets were set " \
           "at runtime" in out["errors"][0]
    assert target_modes(a) == {"b": "sync", "c": "async"}

    a.config["groups"][0]["targets"][0]["mode"] = "sync"
    del a.config["peers"]["c"]
    a.save_config()
    code, out = replicator_cli(a, "reload", "--dry-run")  # a dry run is refused alike
    assert code == 1 and "peers[c] removed, but group(s) db still ship to c" in out["errors"][0]
    assert [e["errors"] for e in kinds(a, "config_reload_refused")] == [[
        "groups[db].targets[b].mode changed, but group db's role and targets were set at "
        "runtime (promote, demote, attach...): run `replicator restore` first, or leave its "
        "targets as they are"]]
    assert target_modes(a) == {"b": "sync", "c": "async"}
