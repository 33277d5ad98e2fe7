"""Property tests of the preflight: for any topology shaped as a tree, with any values
(good and bad) in the keys the inventory may set, the preflight finds nothing to say
exactly when every host's rendered agent config is accepted by the agent; and nothing an
inventory holds makes a filter raise."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import config
from tests.ansible.ansible_harness import filters

F = filters("replicator_topology")
HOSTS = ["h0", "h1", "h2", "h3", "h4"]
SIZES = st.sampled_from(["64MiB", "16MiB", "4KiB", "3KiB", "1GiB", 512, 1000, "lots", 0, True])
DURATIONS = st.sampled_from(["30s", "500ms", 5, 0.05, "2d", "often", -1, None])
VALUES = {  # key: the values tried, good and bad
    "group": {"journal_size": SIZES, "bitmap_granularity": SIZES, "logging_high_water": SIZES,
              "resync_rate": st.sampled_from(["10MiB", 0, "unlimited", "fast"]),
              "durability": st.sampled_from(["flush", "write", "fsync"]),
              "commit_interval": st.sampled_from([1, 0.01, 0, 90, "1s"]),
              "allocation": st.sampled_from(["sparse", "check", "thin"])},
    "link": {"compress": st.sampled_from(["zstd", "none", "lz4"]),
             "compress_level": st.sampled_from([1, 9, 19, 0, 22, "max"]),
             "initial_sync": st.sampled_from(["full", "checksum", "assume-clean", "rsync"]),
             "on_disconnect": st.sampled_from(["continue", "block", "wait"]),
             "max_lag_seconds": DURATIONS, "max_lag_bytes": SIZES,
             "on_lag": st.sampled_from(["alert", "throttle", "block", "panic"]),
             "retain": st.sampled_from(["24h", "1GiB", "1MiB", "3600", "forever"]),
             "apply_delay": DURATIONS},
    "volume": {"size": SIZES, "allocation": st.sampled_from(["preallocate", "sparse", "lazy"])},
}


@st.composite
def topologies(draw):
    """One group over 2..5 hosts whose links form a tree rooted at h0, with random keys."""
    n = draw(st.integers(2, len(HOSTS)))
    links = []
    for i in range(1, n):
        link = {"from": HOSTS[draw(st.integers(0, i - 1))], "to": HOSTS[i],
                "mode": draw(st.sampled_from(["sync", "async", "periodic"]))}
        if link["mode"] == "periodic":
            link["interval"] = draw(st.sampled_from(["10s", "0.01s", "soon"]))
        link.update(draw(st.fixed_dictionaries({}, optional=VALUES["link"])))
        links.append({k: v for k, v in link.items() if v is not None})
    volumes = [{"name": "data", "size": "64MiB"},
               {"name": "log", **draw(st.fixed_dictionaries(
                   {"size": VALUES["volume"]["size"]},
                   optional={"allocation": VALUES["volume"]["allocation"]}))}]
    group = {"name": "db", "primary": "h0", "volumes": volumes, "links": links,
             **draw(st.fixed_dictionaries({}, optional=VALUES["group"]))}
    return [group], HOSTS[:n]


def node_config(groups, node):
    """`node`'s agent config as the role renders it (roles/replicator_agent/vars)."""
    peers = F["replicator_node_peers"](groups, node)
    port = {h: 7800 + i for i, h in enumerate(HOSTS)}
    return {"node": node, "listen": f"127.0.0.1:{port[node]}",
            "nbd_listen": f"127.0.0.1:{port[node] + 100}", "tls": False,
            "peers": {p: f"127.0.0.1:{port[p]}" for p in peers},
            "groups": F["replicator_node_groups"](groups, node, journal_size="256MiB")}


def refused(cfg) -> bool:
    try:
        config.parse(cfg)
    except config.ConfigError:
        return True
    return False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topologies())
def test_the_preflight_speaks_exactly_when_an_agent_would_refuse(topology):
    groups, hosts = topology
    errors = F["replicator_topology_errors"](groups, hosts)
    configs = {h: node_config(groups, h) for h in hosts}
    assert bool(errors) == any(refused(c) for c in configs.values()), errors
    for h, cfg in configs.items():  # and each node's own check names the same errors
        assert bool(F["replicator_config_errors"](cfg, groups)) == refused(cfg)
        assert all(e.startswith(f"{h}: replicator_groups[0] (db): ")
                   for e in F["replicator_config_errors"](cfg, groups))


JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                    | st.sampled_from(["h0", "h1", "sync", "64MiB", "watch"]),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(
                        ["name", "primary", "volumes", "links", "from", "to", "mode", "size",
                         "bunker", "via", "process", "retain", "capture", "interval"]),
                        inner, max_size=6), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(JUNK)
def test_nothing_an_inventory_holds_makes_the_preflight_raise(groups):
    errors = F["replicator_topology_errors"](groups, ["h0", "h1"])
    assert isinstance(errors, list) and all(isinstance(e, str) for e in errors)


@pytest.mark.parametrize("groups", [None, []])
def test_no_topology_is_a_valid_one(groups):
    assert F["replicator_topology_errors"](groups, HOSTS) == []
