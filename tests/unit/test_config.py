"""Config validation: every error names the key path and what is expected."""

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.config import ConfigError, NbdGrant, parse

BASE = """
node: dc1-app
listen: 127.0.0.1:7801
nbd_listen: 127.0.0.1:10801
state_dir: /var/lib/replicator
tls: false
peers: {dc2-dr: 127.0.0.1:7802, dc3-arc: 127.0.0.1:7803}
groups:
  - name: db
    role: primary
    source: null
    journal_size: 256MiB
    volumes:
      - {name: data, path: /srv/data.img, size: 64MiB}
      - {name: log,  path: /srv/log.img,  size: 16MiB}
    targets:
      - {node: dc2-dr, mode: sync}
      - {node: dc3-arc, mode: async, compress: zstd}
"""


def test_the_issue_example_is_valid():
    cfg = parse(yaml.safe_load(BASE))
    g = cfg.group("db")
    assert g.journal_size == 256 << 20 and g.volumes[0].size == 64 << 20
    assert [(t.node, t.mode, t.compress) for t in g.targets] == \
        [("dc2-dr", "sync", "none"), ("dc3-arc", "async", "zstd")]
    assert [(t.initial_sync, t.on_disconnect) for t in g.targets] == [("full", "continue")] * 2
    assert [t.compress_level for t in g.targets] == [1, 1]  # zstd's fastest, unless set
    assert parse(mutate(("groups", 0, "targets", 1, "compress_level"), 9)).group("db") \
        .targets[1].compress_level == 9
    assert cfg.admin_socket == "/var/lib/replicator/admin.sock"
    assert cfg.peers["dc2-dr"] == ("127.0.0.1", 7802)


def assert_refused(data, where, what):
    """parse(data) fails, and the first error is `what` at the key path `where`."""
    with pytest.raises(ConfigError) as exc:
        parse(data)
    assert exc.value.key_path == where
    assert what in str(exc.value)


def mutate(path, value):
    data = yaml.safe_load(BASE)
    cur = data
    for key in path[:-1]:
        cur = cur[key]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return data


@pytest.mark.parametrize("path,value,where,what", [
    (("node",), KeyError, "node", "required"),
    (("listen",), "localhost", "listen", "HOST:PORT"),
    (("nbd_listen",), "127.0.0.1:99999", "nbd_listen", "port"),
    (("groups", 0, "role"), "master", "groups[0].role", "primary, secondary"),
    (("groups", 0, "targets", 1, "mode"), "asnyc", "groups[0].targets[1].mode", "sync, async"),
    (("groups", 0, "targets", 1, "node"), "dc9", "groups[0].targets[1].node", "not in peers"),
    (("groups", 0, "targets", 0, "node"), "dc1-app", "groups[0].targets[0].node", "own node"),
    (("groups", 0, "targets", 1, "compress"), "lz4", "groups[0].targets[1].compress", "zstd"),
    (("groups", 0, "targets", 1, "compress_level"), 22, "groups[0].targets[1].compress_level",
     "zstd level 1..19"),
    (("groups", 0, "targets", 1, "compress_level"), "max", "groups[0].targets[1].compress_level",
     "int"),
    (("groups", 0, "targets", 0, "compress_level"), 3, "groups[0].targets[0].compress_level",
     "only a target with compress: zstd"),
    (("groups", 0, "targets", 1, "initial_sync"), "fast", "groups[0].targets[1].initial_sync",
     "full, checksum, assume-clean"),
    (("groups", 0, "targets", 0, "on_disconnect"), "wait", "groups[0].targets[0].on_disconnect",
     "continue, block"),
    (("groups", 0, "targets", 1, "bunker"), True, "groups[0].targets[1].bunker", "must be sync"),
    (("groups", 0, "bunker"), "dc9", "groups[0].bunker", "not in peers"),
    (("groups", 0, "members"), ["dc9"], "groups[0].members[0]", "not in peers"),
    (("groups", 0, "members"), "dc2-dr", "groups[0].members", "list"),
    (("groups", 0, "volumes", 0, "size"), "64 parsecs", "groups[0].volumes[0].size", "size"),
    (("groups", 0, "volumes", 0, "size"), 1000, "groups[0].volumes[0].size", "512"),
    (("groups", 0, "volumes", 0, "path"), "data.img", "groups[0].volumes[0].path", "absolute"),
    (("groups", 0, "volumes", 1, "name"), "data", "groups[0].volumes", "duplicate"),
    (("groups", 0, "volumes", 1, "path"), "/srv/data.img", "groups[0].volumes[1].path", "already used"),
    (("groups", 0, "volumes"), [], "groups[0].volumes", "at least one"),
    (("groups", 0, "journal_size"), "1MiB", "groups[0].journal_size", "16MiB"),
    (("groups", 0, "source"), "dc2-dr", "groups[0].source", "only a secondary"),
    (("groups", 0, "role"), "secondary", "groups[0].source", "needs"),
    (("groups", 0, "jurnal_size"), "1GiB", "groups[0].jurnal_size", "unknown key"),
    (("peers",), ["a"], "peers", "dict"),
    (("heartbeat_timeout",), 0.5, "heartbeat_timeout", "heartbeat_interval"),
    (("sync_ack_timeout",), 0.5, "sync_ack_timeout", "more than heartbeat_interval"),
    (("sync_ack_timeout",), "soon", "sync_ack_timeout", "int or float"),
    (("nbd_max_connections",), 0, "nbd_max_connections", "at least 1"),
    (("nbd_max_connections",), 1.5, "nbd_max_connections", "int"),
    (("nbd_max_connections_per_export",), 300, "nbd_max_connections_per_export",
     "1..nbd_max_connections (256)"),
    (("nbd_handshake_timeout",), 0, "nbd_handshake_timeout", "positive"),
    # numbers past a float's range are an error of their key, not an OverflowError
    *[(path, 10**400, ".".join(map(str, path)).replace(".0.", "[0]."), "a float can hold")
      for path in [("heartbeat_interval",), ("heartbeat_timeout",), ("sync_ack_timeout",),
                   ("nbd_handshake_timeout",), ("groups", 0, "commit_interval")]],
    (("groups", 0, "bitmap_granularity"), "3KiB", "groups[0].bitmap_granularity", "power of two"),
    (("groups", 0, "logging_high_water"), "1GiB", "groups[0].logging_high_water", "journal_size"),
    (("groups", 0, "resync_rate"), "fast", "groups[0].resync_rate", "size"),
    (("groups", 0, "allocation"), "thin", "groups[0].allocation", "preallocate, check, sparse"),
    (("groups", 0, "volumes", 1, "allocation"), "lazy", "groups[0].volumes[1].allocation",
     "preallocate, check, sparse"),
    (("tls",), KeyError, "tls", "false for plain TCP"),
    (("tls",), True, "tls", "mapping"),
    (("tls",), {"ca": "/a", "cert": "/b"}, "tls.key", "required"),
    (("tls",), {"ca": "/a", "cert": "/b", "key": "k.pem"}, "tls.key", "absolute"),
    (("tls",), {"ca": "/a", "cert": "/b", "key": "/c", "crt": "/d"}, "tls.crt", "unknown"),
])
def test_errors_name_the_key(path, value, where, what):
    assert_refused(mutate(path, value), where, what)


def test_config_check_cli(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text(BASE)
    bad = tmp_path / "bad.yml"
    bad.write_text(BASE.replace("mode: sync", "mode: synchronous"))
    ok = subprocess.run([sys.executable, "-m", "replicator.cli", "config", "check", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    ko = subprocess.run([sys.executable, "-m", "replicator.cli", "config", "check", str(bad)],
                        capture_output=True, text=True)
    assert ko.returncode == 2
    assert "groups[0].targets[0].mode: expected one of sync, async, periodic; got 'synchronous'" in ko.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text("node: [unclosed")
    ko = subprocess.run([sys.executable, "-m", "replicator.cli", "config", "check", str(broken)],
                        capture_output=True, text=True)
    assert ko.returncode == 2 and "not valid YAML" in ko.stderr


def test_a_bunker_group_has_a_source_and_no_volumes():
    data = yaml.safe_load(BASE)
    g = data["groups"][0]
    g.update(role="bunker", source="dc2-dr", volumes=[], targets=[])
    assert parse(data).group("db").role == "bunker"
    g["volumes"] = [{"name": "data", "path": "/srv/data.img", "size": "1MiB"}]
    with pytest.raises(ConfigError, match="a bunker keeps only the journal"):
        parse(data)
    g.update(volumes=[], source=None)
    with pytest.raises(ConfigError, match="a bunker needs the node allowed to ship to it"):
        parse(data)


def test_sync_ack_timeout():
    assert parse(yaml.safe_load(BASE)).sync_ack_timeout == 10.0
    assert parse(mutate(("sync_ack_timeout",), 2)).sync_ack_timeout == 2.0


def test_nbd_limits():
    cfg = parse(yaml.safe_load(BASE))
    assert (cfg.nbd_max_connections, cfg.nbd_max_connections_per_export,
            cfg.nbd_handshake_timeout) == (256, 64, 10.0)
    small = parse(mutate(("nbd_max_connections",), 8))
    assert (small.nbd_max_connections, small.nbd_max_connections_per_export) == (8, 8)


def test_volumes_are_preallocated_unless_the_group_or_the_volume_says_otherwise():
    assert [v.allocation for v in parse(yaml.safe_load(BASE)).group("db").volumes] == \
        ["preallocate", "preallocate"]
    data = mutate(("groups", 0, "allocation"), "check")
    data["groups"][0]["volumes"][1]["allocation"] = "sparse"
    assert [v.allocation for v in parse(data).group("db").volumes] == ["check", "sparse"]


# ---- processing offload (issue 17): via, process, link_keys ------------------------------

def offload(*targets, role="primary", **group):
    """BASE with the group's targets replaced (dc2-dr and dc3-arc) and `group` keys set."""
    data = yaml.safe_load(BASE)
    g = data["groups"][0]
    g.update(targets=list(targets), **group)
    if role == "secondary":
        data["peers"]["dc0-src"] = "127.0.0.1:7800"
        g.update(role="secondary", source="dc0-src")
    return data


def watched(data):
    for v in data["groups"][0]["volumes"]:
        v["capture"] = "watch"
    return data


NEAR = {"node": "dc2-dr", "mode": "sync"}
FAR = {"node": "dc3-arc", "mode": "async"}


def test_a_far_target_processed_via_a_near_one():
    cfg = parse(offload(NEAR, {**FAR, "via": "dc2-dr", "process": ["zstd", "delta", "encrypt"]},
                        link_keys={"dc3-arc": "/etc/replicator/dc3.key"}))
    g = cfg.group("db")
    assert (g.targets[1].via, g.targets[1].process) == ("dc2-dr", ("delta", "zstd", "encrypt"))
    assert (g.targets[0].via, g.targets[0].process) == (None, ())
    assert g.link_keys == {"dc3-arc": "/etc/replicator/dc3.key"}
    # a secondary processes what it receives for its own target; its own key is allowed
    cfg = parse(offload({**FAR, "process": ["checksum"]}, role="secondary",
                        link_keys={"dc1-app": "/k/own.key"}))
    assert cfg.group("db").targets[0].process == ("checksum",)


T = "groups[0].targets"


@pytest.mark.parametrize("data,where,what", [
    (offload(NEAR, {**FAR, "via": "dc2-dr", "process": ["delta", "lz4"]}), f"{T}[1].process[1]",
     "expected one of delta, zstd, checksum, encrypt; got 'lz4'"),
    (offload(NEAR, {**FAR, "via": "dc2-dr", "process": [3]}), f"{T}[1].process[0]", "got 3"),
    (offload(NEAR, {**FAR, "via": "dc2-dr", "process": "delta"}), f"{T}[1].process", "list"),
    (offload(NEAR, {**FAR, "via": "dc2-dr", "process": ["zstd", "zstd"]}), f"{T}[1].process",
     "named twice"),
    (offload({**NEAR, "process": ["delta"]}, FAR), f"{T}[0].process", "this one is sync"),
    (offload({**NEAR, "mode": "periodic", "interval": 60, "process": ["delta"]}, FAR),
     f"{T}[0].process", "this one is periodic"),
    (offload(NEAR, {**FAR, "via": "dc2-dr"}), f"{T}[1].via", "needs `process`"),
    (offload(NEAR, {**FAR, "via": "dc2-dr", "process": []}), f"{T}[1].via", "needs `process`"),
    (offload(NEAR, {**FAR, "via": 7, "process": ["delta"]}), f"{T}[1].via", "expected str"),
    (offload(NEAR, {**FAR, "via": "dc9", "process": ["delta"]}), f"{T}[1].via",
     "'dc9' is not another target of this group"),
    (offload(NEAR, {**FAR, "via": "dc3-arc", "process": ["delta"]}), f"{T}[1].via",
     "'dc3-arc' is not another target of this group"),
    (offload({**NEAR, "bunker": True}, {**FAR, "via": "dc2-dr", "process": ["delta"]}),
     f"{T}[1].via", "'dc2-dr' cannot process for dc3-arc"),
    (offload({**NEAR, "mode": "periodic", "interval": 60},
             {**FAR, "via": "dc2-dr", "process": ["delta"]}), f"{T}[1].via", "cannot process"),
    (offload({**NEAR, "mode": "async", "via": "dc3-arc", "process": ["delta"]},
             {**FAR, "via": "dc2-dr", "process": ["delta"]}), f"{T}[0].via",
     "'dc3-arc' cannot process for dc2-dr"),
    (offload(NEAR, {**FAR, "process": ["delta"]}), f"{T}[1].process",
     "only a secondary processes what it receives"),
    (offload(NEAR, FAR, link_keys={"dc9": "/k/dc9.key"}), "groups[0].link_keys.dc9",
     "'dc9' is not in peers"),
    (offload(NEAR, FAR, link_keys={"dc3-arc": "dc3.key"}), "groups[0].link_keys.dc3-arc",
     "expected an absolute path; got 'dc3.key'"),
    (offload(NEAR, FAR, link_keys={"dc3-arc": None}), "groups[0].link_keys.dc3-arc",
     "absolute path"),
    (offload(NEAR, FAR, link_keys=["/k"]), "groups[0].link_keys", "expected dict"),
    (watched(offload(NEAR, {**FAR, "via": "dc2-dr", "process": ["delta"]})), "groups[0].targets",
     "a watched group's epochs are shipped as they are"),
])
def test_offload_errors_name_the_key(data, where, what):
    assert_refused(data, where, what)


# ---- every error at once (issue 18) -------------------------------------------------------

def test_every_error_of_a_file_is_reported_at_once():
    data = yaml.safe_load(BASE)
    data["listen"] = "localhost"
    g = data["groups"][0]
    g["journal_size"] = "8MiB"
    g["volumes"][0]["size"] = 1000
    g["volumes"][1]["path"] = "log.img"
    g["targets"][1].update(mode="asnyc", compress="lz4")
    data["nbd_max_connections"] = 0
    data["colour"] = "blue"
    with pytest.raises(ConfigError) as exc:
        parse(data)
    assert [path for path, _ in exc.value.errors] == [
        "listen", "groups[0].journal_size", "groups[0].volumes[0].size",
        "groups[0].volumes[1].path", "groups[0].targets[1].mode",
        "groups[0].targets[1].compress", "nbd_max_connections", "colour"]
    assert exc.value.key_path == "listen"  # the first, as callers of one error expect
    assert str(exc.value).splitlines() == [f"{p}: {m}" for p, m in exc.value.errors]


@pytest.mark.parametrize("path,value,where", [
    # a key that fails reads as unknown: what depends on it says nothing more
    (("peers",), ["a"], "peers"),  # no "not in peers" for every target
    (("groups", 0, "journal_size"), "huge", "groups[0].journal_size"),  # no high-water error
    (("groups", 0, "role"), "master", "groups[0].role"),  # no role-dependent checks
    (("groups", 0, "source"), "dc2-dr", "groups[0].source"),  # no "target is the source"
    (("groups", 0, "volumes"), "data", "groups[0].volumes"),  # no "needs a volume"
    (("groups", 0, "volumes", 1, "name"), "data", "groups[0].volumes"),  # not again per node
    (("groups", 0, "targets", 1, "process"), "delta", "groups[0].targets[1].process"),
    (("groups", 0, "targets", 1, "via"), 7, "groups[0].targets[1].via"),
    (("nbd_max_connections",), 0, "nbd_max_connections"),  # per_export not compared to it
    # no "only a target with compress: zstd has a level" for a compress that failed
    (("groups", 0, "targets", 1, "compress"), "lz4", "groups[0].targets[1].compress"),
])
def test_a_failed_key_brings_no_follow_on_errors(path, value, where):
    data = mutate(path, value)
    if path[-1] == "via":
        data["groups"][0]["targets"][1]["process"] = ["delta"]
    if path[-1] == "compress":
        data["groups"][0]["targets"][1]["compress_level"] = 9
    with pytest.raises(ConfigError) as exc:
        parse(data)
    assert [p for p, _ in exc.value.errors] == [where], exc.value.errors


def test_unknown_keys_are_all_named():
    data = mutate(("colour",), "blue")
    data["groups"][0]["targets"][0].update(speed="fast", colour="red")
    with pytest.raises(ConfigError) as exc:
        parse(data)
    assert [p for p, _ in exc.value.errors] == [
        "groups[0].targets[0].colour", "groups[0].targets[0].speed", "colour"]


def test_an_empty_file_names_every_required_key():
    with pytest.raises(ConfigError) as exc:
        parse(None)
    assert [p for p, _ in exc.value.errors] == ["node", "listen", "tls"]


@pytest.mark.parametrize("path,value,text", [
    (("groups", 0, "journal_size"), "8MiB", "expected at least 16MiB; got 8MiB"),
    (("groups", 0, "logging_high_water"), 256 << 20,
     "expected less than journal_size (256MiB); got 256MiB"),
    (("groups", 0, "bitmap_granularity"), 3 << 10, "got 3KiB"),
    (("groups", 0, "volumes", 0, "size"), (64 << 20) + 100,
     "expected a multiple of 512 bytes; got 64.0MiB (67108964 bytes)"),
])
def test_sizes_in_messages_read_as_sizes(path, value, text):
    with pytest.raises(ConfigError) as exc:
        parse(mutate(path, value))
    assert text in str(exc.value)


# ---- listeners: each on a port of its own -------------------------------------------------

@pytest.mark.parametrize("keys,where,what", [
    ({"nbd_listen": "127.0.0.1:7801"}, "nbd_listen", "clashes with listen (127.0.0.1:7801): the same address"),
    ({"nbd_listen": "0.0.0.0:7801"}, "nbd_listen", "0.0.0.0 takes the port on every address"),
    ({"listen": "0.0.0.0:10801"}, "nbd_listen", "clashes with listen (0.0.0.0:10801)"),
    ({"nbd_listen": "[::]:7801"}, "nbd_listen", "[::]:7801 clashes with listen"),
    ({"metrics_listen": "127.0.0.1:10801"}, "metrics_listen", "clashes with nbd_listen"),
    ({"metrics_listen": "0.0.0.0:7801"}, "metrics_listen", "clashes with listen"),
    ({"metrics_listen": "127.0.0.1"}, "metrics_listen", "HOST:PORT"),
])
def test_listeners_that_clash_are_refused(keys, where, what):
    data = yaml.safe_load(BASE)
    data.update(keys)
    assert_refused(data, where, what)


def test_listeners_on_other_ports_or_hosts_are_fine():
    data = yaml.safe_load(BASE)
    data.update(listen="127.0.0.1:7801", nbd_listen="127.0.0.2:7801",
                metrics_listen="0.0.0.0:9808")
    cfg = parse(data)
    assert (cfg.nbd_listen, cfg.metrics_listen) == (("127.0.0.2", 7801), ("0.0.0.0", 9808))
    assert parse(yaml.safe_load(BASE)).metrics_listen is None


# ---- metrics_listen, stall_timeout, lag limits (issue 18) --------------------------------

def test_stall_timeout():
    assert parse(yaml.safe_load(BASE)).stall_timeout == 60.0
    assert parse(mutate(("stall_timeout",), "2m")).stall_timeout == 120.0
    with pytest.raises(ConfigError, match="stall_timeout: expected more than heartbeat_interval"):
        parse(mutate(("stall_timeout",), "500ms"))
    with pytest.raises(ConfigError, match="stall_timeout: expected a duration"):
        parse(mutate(("stall_timeout",), "soon"))


def test_lag_limits():
    g = parse(yaml.safe_load(BASE)).group("db")
    assert [(t.max_lag_seconds, t.max_lag_bytes, t.on_lag) for t in g.targets] == \
        [(None, None, "alert")] * 2
    data = offload(NEAR, {**FAR, "max_lag_seconds": "30s", "on_lag": "throttle"},
                   {"node": "dc3-arc", "mode": "periodic", "interval": 60,
                    "max_lag_seconds": "5m", "max_lag_bytes": "128MiB", "on_lag": "block"})
    data["peers"]["dc3-arc"] = "127.0.0.1:7803"
    data["groups"][0]["targets"][2]["node"] = "dc4-vault"
    data["peers"]["dc4-vault"] = "127.0.0.1:7804"
    t = parse(data).group("db").targets
    assert (t[1].max_lag_seconds, t[1].max_lag_bytes, t[1].on_lag) == (30.0, None, "throttle")
    assert (t[2].max_lag_seconds, t[2].max_lag_bytes, t[2].on_lag) == (300.0, 128 << 20, "block")
    bunker = parse(offload({**NEAR, "bunker": True, "max_lag_bytes": "64MiB"}, FAR))
    assert bunker.group("db").targets[0].on_lag == "alert"


@pytest.mark.parametrize("target,where,what", [
    ({**FAR, "on_lag": "throttle"}, "on_lag", "set max_lag_seconds or max_lag_bytes too"),
    ({**FAR, "max_lag_seconds": 10, "on_lag": "stop"}, "on_lag", "alert, throttle, block"),
    ({**FAR, "max_lag_seconds": "soon"}, "max_lag_seconds", "a duration like 10s"),
    ({**FAR, "max_lag_bytes": "lots"}, "max_lag_bytes", "a size like 64MiB"),
    ({**FAR, "mode": "periodic", "interval": "1m", "max_lag_seconds": "60s"}, "max_lag_seconds",
     "lags by up to its interval (60s) by design: expected more than that; got 60s"),
    ({**NEAR, "bunker": True, "max_lag_seconds": 5, "on_lag": "block"}, "on_lag",
     "a bunker may not block writes: its synchronous copy of the journal is what a takeover"),
    ({**NEAR, "bunker": True, "max_lag_bytes": "1MiB", "on_lag": "throttle"}, "on_lag",
     "a bunker may not throttle"),
    ({**FAR, "max_lag_bytes": "16TiB", "on_lag": "block"}, "max_lag_bytes",
     "16TiB would never be reached: at logging_high_water"),
])
def test_lag_limit_errors_name_the_key(target, where, what):
    assert_refused(offload(target), f"{T}[0].{where}", what)


# ---- the parser takes anything without crashing ------------------------------------------

FULL = yaml.safe_load(BASE)
FULL.update(metrics_listen="127.0.0.1:9808", stall_timeout="30s", heartbeat_interval=1,
            sync_ack_timeout=10, nbd_max_connections=16, log_level="debug")
FULL["groups"][0]["targets"][1].update(max_lag_seconds="10s", max_lag_bytes="64MiB",
                                       on_lag="throttle", via="dc2-dr", process=["zstd"])
FULL["groups"][0].update(link_keys={"dc3-arc": "/k/dc3.key"}, members=["dc2-dr"],
                         resync_rate="10MiB", bitmap_granularity="4KiB")
FULL["groups"].append({"name": "files", "role": "secondary", "source": "dc2-dr",
                       "consistency": "hooks", "freeze": "true", "thaw": "true",
                       "interval": "10s", "volumes": [{"name": "vm", "path": "/srv/vm.img",
                                                       "size": "1GiB", "capture": "watch"}],
                       "targets": [{"node": "dc3-arc", "mode": "periodic", "interval": 30}]})


def _paths(tree, prefix=()):
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (key,))


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)] + list(tree)
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64) | st.floats()
    | st.text(max_size=12) | st.sampled_from(_leaves(FULL)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6) | st.sampled_from(sorted({k for p in _paths(FULL) for k in p
                                                      if isinstance(k, str)})), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutations_of_a_valid_config_never_crash_the_parser(data):
    assert parse(copy.deepcopy(FULL)).group("files").targets[0].interval == 30.0
    tree = copy.deepcopy(FULL)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(list(_paths(tree))))
        if not path:
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        how = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if how == "delete":
            del parent[path[-1]]
        elif how == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(VALUES)
        else:
            parent[path[-1]] = data.draw(VALUES)
    try:
        parse(tree)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(p, str) and m for p, m in exc.errors)
        assert len(str(exc).splitlines()) >= len(exc.errors)


def test_config_check_reports_every_error_as_json(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(BASE.replace("mode: sync", "mode: synchronous")
                   .replace("journal_size: 256MiB", "journal_size: 8MiB"))
    run = [sys.executable, "-m", "replicator.cli", "config", "check"]
    ko = subprocess.run(run + ["--json", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 2
    assert json.loads(ko.stdout) == {"ok": False, "errors": [
        {"path": "groups[0].journal_size", "message": "expected at least 16MiB; got 8MiB"},
        {"path": "groups[0].targets[0].mode",
         "message": "expected one of sync, async, periodic; got 'synchronous'"}]}
    ko = subprocess.run(run + [str(bad)], capture_output=True, text=True)
    assert ko.returncode == 2 and ko.stderr.splitlines() == [
        f"replicator: invalid config {bad}: 2 errors",
        "  groups[0].journal_size: expected at least 16MiB; got 8MiB",
        "  groups[0].targets[0].mode: expected one of sync, async, periodic; got 'synchronous'"]
    good = tmp_path / "good.yml"
    good.write_text(BASE)
    ok = subprocess.run(run + ["--json", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0
    assert json.loads(ok.stdout) == {"ok": True, "errors": [], "node": "dc1-app",
                                     "groups": ["db"]}


# ---- point in time (issue 19): retain, apply_delay ---------------------------------------

def test_retain_is_a_time_or_a_size_and_apply_delay_a_duration():
    assert parse(offload(role="secondary", retain="24h")).group("db").retain_seconds == 86400
    assert parse(offload(role="secondary", retain="2d")).group("db").retain_seconds == 172800
    g = parse(offload(role="secondary", retain="20GiB", apply_delay="15m")).group("db")
    assert (g.retain_bytes, g.retain_seconds, g.apply_delay) == (20 << 30, 0, 900.0)
    g = parse(offload(role="secondary")).group("db")
    assert (g.retain_bytes, g.retain_seconds, g.apply_delay) == (0, 0, 0)


@pytest.mark.parametrize("group,where,what", [
    ({"retain": "soon"}, "retain", "a size like 64MiB"),
    ({"retain": "0s"}, "retain", "expected between 1s and"),
    ({"retain": "400d"}, "retain", "expected between 1s and"),
    ({"apply_delay": "8d"}, "apply_delay", "expected between 0s and 604800s"),
    ({"retain": 3600}, "retain", "expected str"),
    ({"retain": "3600"}, "retain", "is neither (say 3600s, or 3600B)"),
    ({"retain": "4MiB"}, "retain", "expected at least 16MiB"),
    ({"apply_delay": "later"}, "apply_delay", "a duration like 10s"),
])
def test_point_in_time_errors_name_the_key(group, where, what):
    assert_refused(offload(role="secondary", **group), f"groups[0].{where}", what)


def test_a_delayed_secondary_is_a_leaf():
    assert_refused(offload(FAR, role="secondary", apply_delay="15m"), "groups[0].apply_delay",
                   "cannot resync or process for targets of its own")
    assert parse(offload(FAR, role="secondary", retain="1h")).group("db").retain_seconds


@pytest.mark.parametrize("key,value", [("retain", "1h"), ("apply_delay", "5m")])
def test_point_in_time_is_a_secondarys(key, value):
    assert_refused(offload(NEAR, **{key: value}), f"groups[0].{key}", "a key of a secondary")


# ---- NBD listeners: plain on loopback and unix sockets, anywhere else TLS ------------------

TLS = {"ca": "/etc/replicator/pki/ca.crt", "cert": "/etc/replicator/pki/a.crt",
       "key": "/etc/replicator/pki/a.key"}


@pytest.mark.parametrize("keys,where,what", [
    ({"nbd_listen": "10.0.0.1:10809"}, "nbd_listen", "plain NBD has no authentication"),
    ({"nbd_listen": "0.0.0.0:10809"}, "nbd_listen", "use nbd_tls_listen"),
    ({"nbd_listen": "db.example:10809"}, "nbd_listen", "loopback only"),
    ({"nbd_tls_listen": "10.0.0.1:10809", "tls": False}, "nbd_tls_listen",
     "needs the node's TLS files"),
    ({"nbd_socket": "run/nbd.sock"}, "nbd_socket", "absolute path"),
    ({"nbd_socket": "/" + "s" * 120}, "nbd_socket", "too long"),
    ({"nbd_socket": "/run/nbd.sock", "nbd_socket_mode": 0o666}, "nbd_socket_mode",
     "every user of the host"),
    ({"nbd_socket": "/run/nbd.sock", "nbd_socket_mode": "rw"}, "nbd_socket_mode", "octal"),
    ({"nbd_socket": "/run/nbd.sock", "nbd_socket_mode": 0o1777}, "nbd_socket_mode", "octal"),
    ({"nbd_clients": {"app": {"exports": ["data"]}}}, "nbd_clients", "nbd_tls_listen, which is not set"),
    ({"nbd_tls_listen": "10.0.0.1:10809", "nbd_clients": {"app": {"exports": ["nope"]}}},
     "nbd_clients.app.exports", "no volume 'nope'"),
    ({"nbd_tls_listen": "10.0.0.1:10809", "nbd_clients": {"app": {"exports": "data"}}},
     "nbd_clients.app.exports", 'or "*"'),
    ({"nbd_tls_listen": "10.0.0.1:10809", "nbd_clients": {"app": {"exports": [{"a": 1}]}}},
     "nbd_clients.app.exports", "no volume"),
    ({"nbd_tls_listen": "10.0.0.1:10809", "nbd_clients": {"app": {"exports": "*", "access": "w"}}},
     "nbd_clients.app.access", "rw, ro"),
    ({"nbd_tls_listen": "10.0.0.1:10809", "nbd_clients": {"app": {"export": "*"}}},
     "nbd_clients.app.exports", "required"),
    ({"nbd_tls_listen": "10.0.0.1:10809", "nbd_clients": {"a b": {"exports": "*"}}},
     "nbd_clients.a b", "client name"),
])
def test_nbd_listeners_that_would_expose_volumes_are_refused(keys, where, what):
    data = yaml.safe_load(BASE)
    data["tls"] = TLS
    data.update(keys)
    assert_refused(data, where, what)


def test_nbd_listeners_and_grants():
    data = yaml.safe_load(BASE)
    del data["nbd_listen"]
    data["tls"] = TLS
    cfg = parse(data)
    assert (cfg.nbd_socket, cfg.nbd_listen, cfg.nbd_tls_listen) == (
        "/var/lib/replicator/nbd.sock", None, None)  # nothing said: the socket alone
    data.update(nbd_listen="[::1]:10809", nbd_socket="/run/r/nbd.sock", nbd_socket_mode="0640",
                nbd_socket_group="disk", nbd_tls_listen="10.0.0.1:10809",
                nbd_clients={"app": {"exports": ["data"]}, "backup": {"exports": "*", "access": "ro"}})
    cfg = parse(data)
    assert (cfg.nbd_socket, cfg.nbd_socket_mode, cfg.nbd_socket_group) == (
        "/run/r/nbd.sock", 0o640, "disk")
    assert cfg.nbd_listen == ("::1", 10809) and cfg.nbd_tls_listen == ("10.0.0.1", 10809)
    assert cfg.nbd_clients == {"app": NbdGrant(("data",), True), "backup": NbdGrant(("*",), False)}
    data["tls"]["crl"] = "/etc/replicator/pki/crl.pem"
    assert parse(data).tls.crl == "/etc/replicator/pki/crl.pem"


def test_the_readmes_configuration_reference_is_a_valid_config():
    """README's annotated example (every key) parses: the reference says what the agent
    takes."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    start = readme.index("```yaml", readme.index("Configuration (every key is validated")) + 7
    cfg = parse(yaml.safe_load(readme[start:readme.index("```", start)]))
    assert cfg.nbd_socket and cfg.nbd_listen and cfg.nbd_tls_listen and cfg.nbd_clients
    assert cfg.tls.crl
