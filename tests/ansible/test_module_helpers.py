"""Pure parts of the modules and filters: link selection, progress lines, rates, the
status table (including hosts that do not answer), the pair decision, lab validation;
the modules' documentation."""


import pytest

from tests.ansible.ansible_harness import filters, library_module, module_utils

agent = module_utils("replicator_agent")
net = module_utils("replicator_lab_net")
lab = module_utils("replicator_lab")


def target(node, state="replicating", **kw):
    return {"node": node, "mode": "async", "compress": "none", "state": state, "in_sync": True,
            "acked_seq": 10, "lag_records": 0, "lag_bytes": 0, "lag_seconds": 0.0,
            "last_error": "", "resync": None, **kw}


def status(node="dc1-app", targets=(), group="db"):
    return {"node": node, "groups": [{"name": group, "seq": 10, "targets": list(targets),
                                      "journal": {"used_bytes": 1 << 20, "capacity_bytes": 64 << 20,
                                                  "full": False}}]}


def test_select_restricts_and_names_what_is_missing():
    st = status(targets=[target("dc2-dr"), target("dc3-arc")])
    assert [t["node"] for _, t in agent.select(st)] == ["dc2-dr", "dc3-arc"]
    assert [t["node"] for _, t in agent.select(st, "db", ["dc3-arc"])] == ["dc3-arc"]
    with pytest.raises(agent.AgentError, match="does not ship db to dc9"):
        agent.select(st, "db", ["dc9"])
    with pytest.raises(agent.AgentError, match="no group 'web'"):
        agent.select(st, "web")


def test_progress_lines():
    st = status(targets=[target("dc3-arc", "resyncing", compress="zstd", resync={
        "done_bytes": 30 << 20, "total_bytes": 60 << 20, "rate_bytes_per_s": 5 << 20, "eta_seconds": 6})])
    g, t = agent.select(st)[0]
    assert agent.progress_line(agent.link(st, g, t)) == (
        "db dc1-app -> dc3-arc async/zstd: resyncing 50% 30.0MiB/60.0MiB 5.0MiB/s eta 6s")
    st = status(targets=[target("dc2-dr", "connecting", last_error="connection refused")])
    g, t = agent.select(st)[0]
    assert agent.progress_line(agent.link(st, g, t)) == (
        "db dc1-app -> dc2-dr async: connecting seq 10 acked 10 lag 0 rec/0B/0.0s (connection refused)")


@pytest.mark.parametrize("text, value", [("50MiB", 50 << 20), ("1G", 1 << 30), ("0", 0),
                                         ("1.5KiB", 1536), ("100", 100), ("2mb", 2 << 20)])
def test_parse_rate(text, value):
    assert agent.parse_rate(text) == value


def test_parse_rate_refuses_garbage():
    with pytest.raises(agent.AgentError, match="expected bytes per second"):
        agent.parse_rate("fast")


def test_status_table_covers_every_link_even_unreachable_sources():
    groups = [{"name": "db", "primary": "dc1-app", "volumes": [], "links": [
        {"from": "dc1-app", "to": "dc2-dr", "mode": "sync"},
        {"from": "dc1-app", "to": "dc3-arc", "mode": "async", "compress": "zstd"},
        {"from": "dc3-arc", "to": "dc4-vault", "mode": "async"}]}]
    st = status(targets=[target("dc2-dr", mode="sync"),
                         target("dc3-arc", "logging", compress="zstd", last_error="peer away")])
    table = filters("replicator_status")["replicator_status_table"](
        groups, {"dc1-app": {"status": st}, "dc3-arc": {"unreachable": True}})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["GROUP", "LINK", "MODE", "STATE"]
    assert lines[1].split() == ["db", "dc1-app", "->", "dc2-dr", "sync", "replicating", "10", "10",
                                "0", "0B", "0.0", "1.0MiB/64.0MiB", "2%"]
    assert lines[2].split()[4:6] == ["async/zstd", "logging"]
    assert "unknown: dc3-arc unreachable" in lines[3]
    assert lines[4] == "dc1-app -> dc3-arc: peer away"


def test_status_table_shows_the_mode_a_link_really_runs():
    groups = [{"name": "db", "primary": "dc1-app", "volumes": [], "links": [
        {"from": "dc1-app", "to": "dc2-dr", "mode": "sync"}]}]
    st = status(targets=[target("dc2-dr")])  # async since a takeover, not restored
    lines = filters("replicator_status")["replicator_status_table"](
        groups, {"dc1-app": {"status": st}}).splitlines()
    assert lines[1].split()[4] == "async!"
    assert "runs async but the inventory says sync" in lines[2]


def test_status_table_says_what_the_far_replicas_lack_per_bunker():
    groups = [{"name": "db", "primary": "dc1-app", "volumes": [], "links": [
        {"from": "dc1-app", "to": "dc1-bunker", "mode": "sync", "bunker": True}]}]
    st = status(targets=[target("dc1-bunker", mode="sync", bunker=True,
                                far_lag_records={"dc3-arc": 12, "dc2-dr": 0})])
    lines = filters("replicator_status")["replicator_status_table"](
        groups, {"dc1-app": {"status": st}}).splitlines()
    assert lines[-1] == ("dc1-app -> dc1-bunker: bunker; records the far replicas lack: "
                         "dc2-dr 0, dc3-arc 12")


def test_pair_asks_for_a_resync_only_when_one_is_needed():
    pair = library_module("replicator_pair")
    assert pair.wanted({"state": "needs-resync"}, "full")
    assert not pair.wanted({"state": "replicating", "resync": None}, "full")
    assert not pair.wanted({"state": "resyncing", "resync": {"initial": True, "mode": "full"}}, "full")
    assert pair.wanted({"state": "resyncing", "resync": {"initial": True, "mode": "full"}},
                       "assume-clean")
    assert not pair.wanted({"state": "resyncing", "resync": {"mode": "full"}}, "checksum")


HOSTS = [{"name": "dc1-app", "address": "10.213.0.11", "site": "dc1"}]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefix="Bad-Prefix"), "1-8 lowercase letters"),
    (dict(hosts=[{"name": "dc1", "address": "10.9.0.1", "site": "a"}]), "is not in the lab network"),
    (dict(hosts=[{"name": "dc1", "address": "nowhere", "site": "a"}]), "is not an IP address"),
    (dict(hosts=HOSTS + [{"name": "dc2", "address": "10.213.0.11", "site": "a"}]),
     "already used by dc1-app"),
    (dict(hosts=[{"name": "dc1", "address": "10.213.0.1", "site": "a"}]), "already used by the controller"),
    (dict(hosts=[{"name": "DC_1", "address": "10.213.0.5", "site": "a"}]), "lowercase letters, digits"),
    (dict(sites={"dc1": {"uplink": "fast"}}), "expected a rate like 100mbit"),
])
def test_lab_refuses_bad_inventories(kwargs, message):
    args = dict(lab_dir="/nonexistent", prefix="rlab", network="10.213.0.0/24", hosts=HOSTS,
                sites={}) | kwargs
    with pytest.raises(net.LabError, match=message):
        lab.Lab(**args)


def test_lab_rates_and_names():
    assert net.rate_bits("100mbit") == 100_000_000 and net.rate_bits("1gbit") == 10**9
    lb = lab.Lab("/x", "rlab", "10.213.0.0/24", HOSTS, {"dc1": {"uplink": "50mbit"}})
    host = lb.host("dc1-app")
    assert (lb.net.netns(host), lb.net.host_if(host), lb.net.site_ifs("dc1")) == (
        "rlab-dc1-app", "rlabh0", ("rlabs0", "rlabu0", "rlabw0"))
    assert lb.uplinks == {"dc1": 50_000_000} and lb.controller == "10.213.0.1"


def test_compare_helpers():
    f = filters("replicator_status")
    groups = [{"name": "db", "primary": "dc1-app", "volumes": [{"name": "data", "size": 1}],
               "links": [{"from": "dc1-app", "to": "dc2-dr", "mode": "sync"}]}]
    seqs = f["replicator_primary_seqs"](groups, {"dc1-app": {"status": status()}})
    assert seqs == {"db": 10}
    with pytest.raises(ValueError, match="no status from dc1-app"):
        f["replicator_primary_seqs"](groups, {"dc1-app": {"unreachable": True}})
    behind = {"groups": [{"name": "db", "applied_seq": 9}, {"name": "other", "applied_seq": 0}]}
    assert not f["replicator_caught_up"](behind, seqs)
    behind["groups"][0]["applied_seq"] = 10
    assert f["replicator_caught_up"](behind, seqs)
    (vol,) = filters("replicator_topology")["replicator_node_volumes"](groups, "dc2-dr", "/v")
    assert vol == {"key": "db/data", "group": "db", "volume": "data", "path": "/v/db/data.img",
                   "primary": "dc1-app"}


@pytest.mark.parametrize("action", ["up", "down"])
def test_lab_refuses_to_run_without_root(action, monkeypatch, tmp_path):
    lb = lab.Lab(str(tmp_path), "rlab", "10.213.0.0/24", HOSTS, {})
    monkeypatch.setattr(lab.os, "geteuid", lambda: 1000)
    with pytest.raises(net.LabError, match="the lab needs root.*sudo"):
        getattr(lb, action)()


def test_lab_metrics_targets_are_the_hosts_that_serve_metrics():
    targets = filters("replicator_lab")["replicator_lab_metrics_targets"]
    hostvars = {"a": {"replicator_agent_metrics_listen": "10.0.0.1:9808"},
                "b": {"replicator_agent_metrics_listen": ""}, "c": {}}
    assert targets(["a", "b", "c"], hostvars) == {"a": "10.0.0.1:9808"}
