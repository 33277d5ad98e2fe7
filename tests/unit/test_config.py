"""Config validation: every error names the key path and what is expected."""

import subprocess
import sys

import pytest
import yaml

from replicator.config import ConfigError, parse

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
    assert cfg.admin_socket == "/var/lib/replicator/admin.sock"
    assert cfg.peers["dc2-dr"] == ("127.0.0.1", 7802)


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
    (("tls",), {"ca": "/a", "cert": "/b", "key": "/c", "crl": "/d"}, "tls.crl", "unknown"),
])
def test_errors_name_the_key(path, value, where, what):
    with pytest.raises(ConfigError) as exc:
        parse(mutate(path, value))
    assert exc.value.key_path == where
    assert what in str(exc.value)


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
    with pytest.raises(ConfigError) as exc:
        parse(data)
    assert exc.value.key_path == where
    assert what in str(exc.value)
