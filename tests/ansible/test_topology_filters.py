"""The topology filters: validation messages an operator can act on, and the per-node
agent configuration they render."""

import copy
import re

import pytest

from replicator import config
from tests.ansible.ansible_harness import filters

F = filters("replicator_topology")
HOSTS = ["dc1-app", "dc2-dr", "dc3-arc", "dc4-vault"]
LAB = [{
    "name": "db",
    "primary": "dc1-app",
    "volumes": [{"name": "data", "size": "64MiB"}, {"name": "log", "size": "16MiB", "path": "/srv/log.img"}],
    "links": [
        {"from": "dc1-app", "to": "dc2-dr", "mode": "sync"},
        {"from": "dc1-app", "to": "dc3-arc", "mode": "async", "compress": "zstd",
         "initial_sync": "checksum"},
        {"from": "dc3-arc", "to": "dc4-vault", "mode": "async"},
    ],
}]


def errors_after(change):
    groups = copy.deepcopy(LAB)
    change(groups[0])
    return F["replicator_topology_errors"](groups, HOSTS)


def test_the_lab_topology_is_valid():
    assert F["replicator_topology_errors"](LAB, HOSTS) == []


@pytest.mark.parametrize("change, expected", [
    (lambda g: g["links"].append({"from": "dc2-dr", "to": "dc4-vault", "mode": "async"}),
     "dc4-vault already receives db from dc3-arc; a replica has exactly one source"),
    (lambda g: g["links"].append({"from": "dc2-dr", "to": "dc1-app", "mode": "sync"}),
     "ships to the primary"),
    (lambda g: g["links"].append({"from": "dc1-app", "to": "dc9-x", "mode": "sync"}),
     "to 'dc9-x' is not a host of the inventory group"),
    (lambda g: g["links"][0].update(mode="asnyc"), "links[0] (dc1-app -> dc2-dr): mode: expected one of sync, async, periodic; got 'asnyc'"),
    (lambda g: g["links"][1].update(compress="lz4"), "links[1] (dc1-app -> dc3-arc): compress: expected one of none, zstd; got 'lz4'"),
    (lambda g: g["links"][1].update(initial_sync="rsync"),
     "links[1] (dc1-app -> dc3-arc): initial_sync: expected one of full, checksum, assume-clean"),
    (lambda g: g["links"][0].update(on_disconnect="wait"),
     "links[0] (dc1-app -> dc2-dr): on_disconnect: expected one of continue, block; got 'wait'"),
    (lambda g: g.update(primary="dc5"), "primary 'dc5' is not a host of the inventory group"),
    (lambda g: g["links"].append({"from": "dc2-dr", "to": "dc2-dr", "mode": "sync"}),
     "dc2-dr links to itself"),
    (lambda g: g["links"].__setitem__(2, {"from": "dc4-vault", "to": "dc3-arc", "mode": "async"}),
     "dc3-arc already receives db from dc1-app"),
    (lambda g: g.update(volumes=[]), "volumes must be a non-empty list"),
    (lambda g: g["volumes"].append({"name": "data", "size": "1MiB"}), "volume 'data' is declared twice"),
    (lambda g: g["links"][0].update(rate="1G"), "unknown key 'rate'"),
    (lambda g: g["links"][2].update(mode="periodic"), "links[2] (dc3-arc -> dc4-vault): interval: a periodic target needs an interval"),
    (lambda g: g["links"][2].update(interval="30s"), "links[2] (dc3-arc -> dc4-vault): interval: only a periodic target has an interval"),
    (lambda g: g["volumes"][0].update(capture="inotify"), "volumes[0] (data): capture: expected one of nbd, watch; got 'inotify'"),
    (lambda g: g["volumes"][0].update(capture="watch"), "all capture: watch or all capture: nbd"),
    (lambda g: g.update(consistency="reflink"), "(db): consistency: only a group of watched volumes (capture: watch) has this key"),
])
def test_broken_topologies_are_explained(change, expected):
    errors = errors_after(change)
    assert any(expected in e for e in errors), errors


def test_a_loop_detached_from_the_primary_is_not_a_tree():
    groups = [{"name": "g", "primary": "dc1-app", "volumes": [{"name": "v", "size": 1 << 20}],
               "links": [{"from": "dc2-dr", "to": "dc3-arc", "mode": "async"},
                         {"from": "dc3-arc", "to": "dc2-dr", "mode": "async"}]}]
    errors = F["replicator_topology_errors"](groups, HOSTS)
    assert any("not fed by the primary dc1-app" in e and "tree rooted at the primary" in e
               for e in errors), errors


def test_volume_names_are_unique_per_host_across_groups():
    other = {"name": "web", "primary": "dc2-dr", "volumes": [{"name": "data", "size": 1 << 20}],
             "links": []}
    errors = F["replicator_topology_errors"](LAB + [other], HOSTS)
    assert errors == ["dc2-dr: volume 'data' is in groups db and web; volume names are NBD "
                      "export names and must be unique per host"]


def test_node_groups_render_roles_sources_targets_and_default_paths():
    node_groups = F["replicator_node_groups"]
    (primary,) = node_groups(LAB, "dc1-app", volume_dir="/v", journal_size="32MiB")
    assert primary["role"] == "primary" and primary["source"] is None
    assert primary["journal_size"] == "32MiB"
    assert primary["volumes"] == [{"name": "data", "path": "/v/db/data.img", "size": "64MiB"},
                                  {"name": "log", "path": "/srv/log.img", "size": "16MiB"}]
    # a target has the keys its link sets, the agent's defaults for the rest
    assert primary["targets"] == [
        {"node": "dc2-dr", "mode": "sync"},
        {"node": "dc3-arc", "mode": "async", "compress": "zstd", "initial_sync": "checksum"}]
    (cascade,) = node_groups(LAB, "dc3-arc")
    assert (cascade["role"], cascade["source"]) == ("secondary", "dc1-app")
    assert cascade["targets"] == [{"node": "dc4-vault", "mode": "async"}]
    assert cascade["volumes"][0]["path"] == "/var/lib/replicator/volumes/db/data.img"
    (leaf,) = node_groups(LAB, "dc4-vault")
    assert (leaf["role"], leaf["source"], leaf["targets"]) == ("secondary", "dc3-arc", [])
    assert node_groups(LAB, "elsewhere") == []


def test_peers_links_and_endpoints():
    # every other member: a promoted replica ships to any of them
    assert F["replicator_node_peers"](LAB, "dc3-arc") == ["dc1-app", "dc2-dr", "dc4-vault"]
    assert F["replicator_node_peers"](LAB, "dc2-dr") == ["dc1-app", "dc3-arc", "dc4-vault"]
    assert F["replicator_node_peers"](LAB, "elsewhere") == []
    links = F["replicator_links"]
    assert [(l["from"], l["to"]) for l in links(LAB, source="dc1-app")] == [
        ("dc1-app", "dc2-dr"), ("dc1-app", "dc3-arc")]
    assert [l["to"] for l in links(LAB, target="dc4-vault")] == ["dc4-vault"]
    assert links(LAB, group="other") == []
    endpoint = F["replicator_endpoint"]
    assert endpoint({"inventory_hostname": "a", "ansible_host": "10.0.0.1"}, 7789) == "10.0.0.1:7789"
    assert endpoint({"inventory_hostname": "a", "replicator_agent_address": "192.0.2.1",
                     "replicator_agent_port": 7000}, 7789) == "192.0.2.1:7000"
    assert endpoint({"inventory_hostname": "a"}, 7789) == "a:7789"


def test_a_bunker_link_renders_a_journal_only_member():
    groups = copy.deepcopy(LAB)
    groups[0]["links"].append({"from": "dc1-app", "to": "dc1-bunker", "mode": "sync",
                               "bunker": True})
    assert F["replicator_topology_errors"](groups, HOSTS + ["dc1-bunker"]) == []
    node_groups = F["replicator_node_groups"]
    (bunker,) = node_groups(groups, "dc1-bunker")
    assert (bunker["role"], bunker["source"], bunker["volumes"]) == ("bunker", "dc1-app", [])
    # the far replicas may read its journal at a takeover (FETCH is for members only)
    assert sorted(bunker["members"]) == sorted(
        h for h in HOSTS if h not in ("dc1-app", "dc1-bunker")) and "dc1-app" not in bunker["members"]
    (primary,) = node_groups(groups, "dc1-app")
    assert primary["targets"][-1]["bunker"] is True and "bunker" not in primary
    (far,) = node_groups(groups, "dc3-arc")
    assert far["bunker"] == "dc1-bunker"  # what a takeover on dc3-arc replays from


@pytest.mark.parametrize("change,message", [
    (lambda links: links.append({"from": "dc1-app", "to": "dc1-bunker", "mode": "async",
                                 "bunker": True}), "must be linked from the primary dc1-app"),
    (lambda links: links.append({"from": "dc3-arc", "to": "dc1-bunker", "mode": "sync",
                                 "bunker": True}), "must be linked from the primary dc1-app"),
    (lambda links: links.extend([{"from": "dc1-app", "to": "dc1-bunker", "mode": "sync",
                                  "bunker": True},
                                 {"from": "dc1-bunker", "to": "dc4-vault", "mode": "async"}]),
     "bunker dc1-bunker cannot ship"),
])
def test_bad_bunker_links(change, message):
    groups = copy.deepcopy(LAB)
    change(groups[0]["links"])
    errors = F["replicator_topology_errors"](groups, HOSTS + ["dc1-bunker"])
    assert any(message in e for e in errors), errors



def test_retain_and_apply_delay_of_a_link_go_to_its_replica_only():
    groups = copy.deepcopy(LAB)
    groups[0]["links"][2].update(retain="24h", apply_delay="15m")  # dc3-arc -> dc4-vault
    groups[0]["links"][1]["retain"] = "1GiB"                      # dc1-app -> dc3-arc
    assert F["replicator_topology_errors"](groups, HOSTS) == []
    node_groups = F["replicator_node_groups"]
    (leaf,) = node_groups(groups, "dc4-vault")
    assert (leaf["retain"], leaf["apply_delay"]) == ("24h", "15m")
    (cascade,) = node_groups(groups, "dc3-arc")
    assert cascade["retain"] == "1GiB" and "apply_delay" not in cascade
    assert all(set(t) & {"retain", "apply_delay"} == set() for t in cascade["targets"])
    (primary,) = node_groups(groups, "dc1-app")
    assert "retain" not in primary and "apply_delay" not in primary
    # the agent takes them as they are rendered (its config check, as the role runs it)
    cfg = config.parse({"node": "dc4-vault", "listen": "127.0.0.1:7789", "tls": False,
                        "nbd_listen": "127.0.0.1:10809", "peers": {"dc3-arc": "127.0.0.1:7790"},
                        "groups": [leaf]})
    assert (cfg.groups[0].retain_seconds, cfg.groups[0].apply_delay) == (86400, 900)


@pytest.mark.parametrize("link,message", [
    ({"from": "dc1-app", "to": "dc1-bunker", "mode": "sync", "bunker": True, "retain": "1h"},
     "links[3] (dc1-app -> dc1-bunker): retain: a key of a secondary (its volumes keep the "
     "history); this node is the group's bunker"),
    ({"from": "dc1-app", "to": "dc1-bunker", "mode": "sync", "apply_delay": ["15m"]},
     "links[3] (dc1-app -> dc1-bunker): apply_delay: expected a duration like 10s or 500ms; "
     "got ['15m']"),
    ({"from": "dc1-app", "to": "dc1-bunker", "mode": "sync", "retain": True},
     "links[3] (dc1-app -> dc1-bunker): retain: expected str; got True"),
])
def test_bad_retain_and_apply_delay(link, message):
    groups = copy.deepcopy(LAB)
    groups[0]["links"].append(link)
    errors = F["replicator_topology_errors"](groups, HOSTS + ["dc1-bunker"])
    assert any(message in e for e in errors), errors


# The takeover plans of the DR playbooks: the five-host lab topology, then small ones.
FIVE = [{
    "name": "db", "primary": "dc1-app", "volumes": [{"name": "data", "size": "64MiB"}],
    "links": [
        {"from": "dc1-app", "to": "dc2-dr", "mode": "sync"},
        {"from": "dc1-app", "to": "dc1-bunker", "mode": "sync", "bunker": True},
        {"from": "dc1-app", "to": "dc3-arc", "mode": "async", "compress": "zstd"},
        {"from": "dc3-arc", "to": "dc4-vault", "mode": "async"},
    ],
}]
plan = F["replicator_failover_plan"]


def test_the_promoted_intermediate_takes_over_the_lost_primarys_links():
    p = plan(FIVE, "db", "dc1-app", "dc3-arc")
    assert p["promote_targets"] == ["dc2-dr:sync", "dc1-bunker:sync:bunker", "dc4-vault:async"]
    assert p["steps"] == [{"node": "dc2-dr", "source": "dc3-arc", "attach": []},
                          {"node": "dc1-bunker", "source": "dc3-arc", "attach": []}]
    assert p["wait"] == {"dc3-arc": ["dc2-dr", "dc1-bunker", "dc4-vault"]}
    assert "dc1-app" not in p["survivors"] and p["bunker"] == "dc1-bunker"
    # the lost primary comes back over the link it had towards the promoted node, mirrored
    assert p["failback_link"] == "dc1-app:async:zstd"


def test_promoting_the_sync_replica_keeps_the_cascade_below_it():
    p = plan(FIVE, "db", "dc1-app", "dc2-dr")
    assert p["promote_targets"] == ["dc1-bunker:sync:bunker", "dc3-arc:async:zstd"]
    assert p["wait"] == {"dc2-dr": ["dc1-bunker", "dc3-arc"], "dc3-arc": ["dc4-vault"]}
    assert [s["node"] for s in p["steps"]] == ["dc1-bunker", "dc3-arc"]  # dc4-vault keeps dc3-arc
    assert p["failback_link"] == "dc1-app:sync"


def test_promoting_a_leaf_reverses_the_links_above_it():
    """dc4-vault below dc3-arc: dc3-arc becomes its replica (told first, so dc4-vault no
    longer hears it when promoted) and dc4-vault takes over dc1-app's links."""
    p = plan(FIVE, "db", "dc1-app", "dc4-vault")
    assert p["steps"][0] == {"node": "dc3-arc", "source": "dc4-vault", "attach": []}
    assert sorted(p["promote_targets"]) == ["dc1-bunker:sync:bunker", "dc2-dr:sync", "dc3-arc:async"]
    assert {(lk["from"], lk["to"]) for lk in p["links"]} == {
        ("dc4-vault", "dc2-dr"), ("dc4-vault", "dc1-bunker"), ("dc4-vault", "dc3-arc")}


def test_a_longer_path_is_reversed_hop_by_hop():
    chain = [{"name": "c", "primary": "a", "volumes": [{"name": "v", "size": 1}], "links": [
        {"from": "a", "to": "b", "mode": "async"}, {"from": "b", "to": "c", "mode": "sync"},
        {"from": "c", "to": "d", "mode": "async", "on_disconnect": "block"}]}]
    p = plan(chain, "c", "a", "d")
    assert p["steps"] == [{"node": "b", "source": "c", "attach": []},
                          {"node": "c", "source": "d", "attach": ["b:sync"]}]
    assert p["promote_targets"] == ["c:async:block"]
    assert p["wait"] == {"d": ["c"], "c": ["b"]}
    assert p["failback_link"] == "a:async"


def test_a_pair_has_no_survivor_to_wait_for():
    pair = [{"name": "p", "primary": "a", "volumes": [{"name": "v", "size": 1}],
             "links": [{"from": "a", "to": "b", "mode": "sync"}]}]
    p = plan(pair, "p", "a", "b")
    assert p["promote_targets"] == [] and p["steps"] == [] and p["wait"] == {}
    assert p["survivors"] == ["b"] and p["failback_link"] == "a:sync"


@pytest.mark.parametrize("lost, promoted, message", [
    ("dc2-dr", "dc3-arc", "dc2-dr is not the primary of db (dc1-app is)"),
    ("dc1-app", "dc1-bunker", "dc1-bunker is the bunker of db: it holds no volumes"),
    ("dc1-app", "dc9-x", "'dc9-x' is not a replica of db"),
    ("dc1-app", "dc1-app", "'dc1-app' is not a replica of db"),
])
def test_impossible_takeovers_are_explained(lost, promoted, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(FIVE, "db", lost, promoted)
    with pytest.raises(ValueError, match="no group 'nope'"):
        plan(FIVE, "nope", lost, promoted)


def test_the_drill_promotes_an_async_replica_else_a_sync_one():
    assert F["replicator_drill_target"](FIVE, "db") == "dc3-arc"
    pair = [{"name": "p", "primary": "a", "volumes": [], "links": [
        {"from": "a", "to": "k", "mode": "sync", "bunker": True},
        {"from": "a", "to": "b", "mode": "sync"}]}]
    assert F["replicator_drill_target"](pair, "p") == "b"


def test_drill_volume_must_be_a_volume_of_the_group():
    groups = copy.deepcopy(LAB)
    groups[0]["drill_volume"] = "log"
    assert F["replicator_topology_errors"](groups, HOSTS) == []
    groups[0]["drill_volume"] = "nope"
    (error,) = F["replicator_topology_errors"](groups, HOSTS)
    assert "drill_volume 'nope' is not one of its volumes (data, log)" in error


def test_outgoing_links_of_the_declared_topology():
    assert F["replicator_outgoing"](FIVE, "db") == {
        "dc1-app": ["dc2-dr", "dc1-bunker", "dc3-arc"], "dc3-arc": ["dc4-vault"]}


WATCHED = {"name": "files", "primary": "dc1-app", "consistency": "hooks",
           "freeze": "fsfreeze -f /srv/files", "thaw": "fsfreeze -u /srv/files", "interval": "5s",
           "volumes": [{"name": "vm", "size": "64MiB", "path": "/srv/files/vm.img",
                        "capture": "watch"}],
           "links": [{"from": "dc1-app", "to": "dc3-arc", "mode": "async"},
                     {"from": "dc3-arc", "to": "dc4-vault", "mode": "periodic", "interval": "30s"}]}


def test_a_watched_group_is_watched_on_its_primary_only_and_periodic_links_keep_their_interval():
    assert F["replicator_topology_errors"]([WATCHED], HOSTS) == []
    primary = F["replicator_node_groups"]([WATCHED], "dc1-app")[0]
    assert primary["volumes"][0]["capture"] == "watch"
    assert (primary["consistency"], primary["freeze"], primary["interval"]) == \
        ("hooks", "fsfreeze -f /srv/files", "5s")
    middle = F["replicator_node_groups"]([WATCHED], "dc3-arc")[0]
    assert "capture" not in middle["volumes"][0] and "consistency" not in middle
    assert middle["targets"][0]["mode"] == "periodic" and middle["targets"][0]["interval"] == "30s"
    plan = F["replicator_failover_plan"]([WATCHED], "files", "dc1-app", "dc4-vault")
    assert plan["steps"][0]["attach"] == [] and plan["promote_targets"] == ["dc3-arc:periodic=30s"]


OFFLOADED = {"from": "dc1-app", "to": "dc3-arc", "mode": "async", "compress": "zstd",
             "via": "dc2-dr", "process": ["delta", "zstd", "checksum", "encrypt"]}


@pytest.mark.parametrize("change, expected", [
    (lambda g: g["links"][1].update(OFFLOADED, process=["lz4"]),
     "links[1] (dc1-app -> dc3-arc): process[0]: expected one of delta, zstd, checksum, encrypt"),
    (lambda g: g["links"][1].update(OFFLOADED, mode="sync"), "links[1] (dc1-app -> dc3-arc): process: only an async target's records are processed"),
    (lambda g: g["links"][1].update(OFFLOADED, via="dc4-vault"),
     "links[1] (dc1-app -> dc3-arc): via: 'dc4-vault' is not another target of this group"),
    (lambda g: g["links"][1].update({k: v for k, v in OFFLOADED.items() if k != "via"}),
     "links[1] (dc1-app -> dc3-arc): process: only a secondary processes what it receives"),
    (lambda g: (g["links"][1].update(OFFLOADED),
                g["links"][0].update(bunker=True)), "links[1] (dc1-app -> dc3-arc): via: 'dc2-dr' cannot process for dc3-arc"),
])
def test_bad_offloaded_links(change, expected):
    errors = errors_after(change)
    assert any(expected in e for e in errors), errors


def test_an_offloaded_link_renders_via_process_and_link_keys_on_its_two_ends_only():
    groups = copy.deepcopy(LAB)
    groups[0]["links"][1] = dict(OFFLOADED)
    assert F["replicator_topology_errors"](groups, HOSTS) == []
    key = "/etc/replicator/pki/links/db-dc3-arc.key"
    by_node = {n: F["replicator_node_groups"](groups, n)[0] for n in HOSTS}
    (far,) = [t for t in by_node["dc1-app"]["targets"] if t["node"] == "dc3-arc"]
    assert far["via"] == "dc2-dr" and far["process"] == OFFLOADED["process"]
    assert by_node["dc2-dr"]["link_keys"] == {"dc3-arc": key}
    assert by_node["dc3-arc"]["link_keys"] == {"dc3-arc": key}
    assert "link_keys" not in by_node["dc1-app"] and "link_keys" not in by_node["dc4-vault"]
    assert [F["replicator_node_link_keys"](groups, n) for n in HOSTS] == \
        [[], ["db-dc3-arc"], ["db-dc3-arc"], []]
    # a takeover by the near node itself: the far link it takes over is plain
    p = plan(groups, "db", "dc1-app", "dc2-dr")
    assert {"from": "dc2-dr", "to": "dc3-arc", "mode": "async", "compress": "zstd"} \
        in p["links"]


def test_a_replica_processes_for_its_own_link_without_via():
    groups = copy.deepcopy(LAB)
    groups[0]["links"][2].update(process=["delta", "zstd", "encrypt"])
    assert F["replicator_topology_errors"](groups, HOSTS) == []
    assert F["replicator_node_link_keys"](groups, "dc3-arc") == ["db-dc4-vault"]
    assert F["replicator_node_link_keys"](groups, "dc4-vault") == ["db-dc4-vault"]
