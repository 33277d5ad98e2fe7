"""Both inventories declare a valid topology, and the replicator_agent role renders, for
every host, an agent configuration that the agent itself accepts and that matches the
topology (roles, sources, targets, peers)."""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from replicator import config
from tests.ansible.ansible_harness import ROOT, filters
from tests.ansible.lab_harness import BIN

TOPOLOGY = filters("replicator_topology")
ENV = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"),
           PATH=f"{BIN}:{os.environ.get('PATH', '')}")


def inventory(name):
    out = subprocess.run([os.path.join(BIN, "ansible-inventory"), "-i", f"inventories/{name}",
                          "--list"], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture
def short_tmp():
    """pytest's tmp_path is too long for the admin socket paths rendered under it."""
    path = tempfile.mkdtemp(prefix="rcfg")
    yield path
    shutil.rmtree(path)


def run_render(name, tmp_path, *args):
    """The role's preflight and configure steps for every host of inventory `name`."""
    os.makedirs(os.path.join(tmp_path, "install"), exist_ok=True)
    if not os.path.exists(os.path.join(tmp_path, "install", "venv")):
        os.symlink(os.path.dirname(BIN), os.path.join(tmp_path, "install", "venv"))
    return subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", f"inventories/{name}",
                           "tests/ansible/render_config.yml", "-e", f"render_dir={tmp_path}",
                           *args], cwd=ROOT, env=ENV, capture_output=True, text=True)


def render(name, tmp_path, *args):
    p = run_render(name, tmp_path, *args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    return {h: config.load(os.path.join(tmp_path, h, "etc", "agent.yml"))
            for h in os.listdir(tmp_path) if h != "install"}


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes root-owned files")
@pytest.mark.parametrize("name", ["lab", "example"])
def test_inventory_topology_and_rendered_configs(name, short_tmp):
    inv = inventory(name)
    hosts = inv["replicator"]["hosts"] if "hosts" in inv["replicator"] else [
        h for child in inv["replicator"]["children"] for h in inv[child]["hosts"]]
    hostvars = inv["_meta"]["hostvars"]
    groups = hostvars[hosts[0]]["replicator_groups"]
    assert TOPOLOGY["replicator_topology_errors"](groups, hosts) == []
    configs = render(name, short_tmp)  # config.load raises ConfigError on anything invalid
    assert sorted(configs) == sorted(hosts)
    for node, cfg in configs.items():
        assert cfg.node == node and cfg.tls is not None
        assert cfg.listen == (str(hostvars[node].get("replicator_agent_address")
                                  or hostvars[node]["ansible_host"]), 7789)
        # both inventories serve metrics on the host's address, for a Prometheus elsewhere
        assert cfg.metrics_listen == (str(hostvars[node]["ansible_host"]), 9808)
        expected = {g["name"]: g for g in TOPOLOGY["replicator_node_groups"](groups, node)}
        assert {g.name for g in cfg.groups} == set(expected)
        for g in cfg.groups:
            assert g.role == expected[g.name]["role"] and g.source == expected[g.name]["source"]
            assert [(t.node, t.mode, t.compress) for t in g.targets] == [
                (t["node"], t["mode"], t.get("compress", "none"))
                for t in expected[g.name]["targets"]]
            # a link's retain / apply_delay reach the replica it ships to, as the agent reads them
            want = expected[g.name]
            assert bool(g.retain_seconds or g.retain_bytes) == ("retain" in want)
            assert (g.apply_delay > 0) == ("apply_delay" in want)
        assert sorted(cfg.peers) == TOPOLOGY["replicator_node_peers"](groups, node)
        check_unit(os.path.join(short_tmp, node), cfg)


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes root-owned files")
def test_an_empty_metrics_listen_turns_the_endpoint_off(short_tmp):
    configs = render("lab", short_tmp, "-e", json.dumps({"replicator_agent_metrics_listen": ""}))
    assert configs and all(cfg.metrics_listen is None for cfg in configs.values())
    with open(os.path.join(short_tmp, "dc1-app", "etc", "agent.yml")) as f:
        assert "metrics_listen" not in f.read()


def _lab_groups():
    return inventory("lab")["_meta"]["hostvars"]["dc1-app"]["replicator_groups"]


def _set(path, value):
    """The lab's topology with the key at `path` (indexes and keys) set to `value`."""
    groups = _lab_groups()
    cur = groups
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = value
    return {"replicator_groups": groups}


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes root-owned files")
@pytest.mark.parametrize("extra,message", [
    # group, link and volume keys of the inventory: the agent's checks, at preflight
    (lambda: _set((0, "links", 2, "max_lag_bytes"), "lots"),
     "replicator_groups[0] (db): links[2] (dc1-app -> dc3-arc): max_lag_bytes: expected a "
     "size like 64MiB or a byte count; got 'lots'"),
    (lambda: _set((0, "links", 2, "compress_level"), 25),
     "links[2] (dc1-app -> dc3-arc): compress_level: expected a zstd level 1..19; got 25"),
    (lambda: _set((0, "bitmap_granularity"), "3KiB"),
     "replicator_groups[0] (db): bitmap_granularity: expected a power of two of at least 4KiB"),
    (lambda: _set((0, "logging_high_water"), "64MiB"),
     "replicator_groups[0] (db): logging_high_water: expected less than journal_size (64MiB)"),
    (lambda: _set((0, "volumes", 1, "size"), "1000"),
     "replicator_groups[0] (db): volumes[1] (log): size: expected a multiple of 512 bytes"),
    (lambda: _set((1, "links", 1, "interval"), "often"),
     "replicator_groups[1] (files): links[1] (dc3-arc -> dc4-vault): interval: expected a "
     "duration like 10s or 500ms; got 'often'"),
    # node-wide role variables, named as such
    (lambda: {"replicator_agent_stall_timeout": "soon"},
     "replicator_agent_stall_timeout (agent key stall_timeout): expected a duration"),
    (lambda: {"replicator_agent_nbd_max_connections": 8,
              "replicator_agent_nbd_max_connections_per_export": 9},
     "replicator_agent_nbd_max_connections_per_export (agent key "
     "nbd_max_connections_per_export): expected 1..nbd_max_connections (8); got 9"),
    (lambda: {"replicator_agent_journal_size": "1MiB",
              "replicator_groups": [{k: v for k, v in g.items() if k != "journal_size"}
                                    for g in _lab_groups()]},
     "journal_size (the role's replicator_agent_journal_size): expected at least 16MiB"),
])
def test_bad_values_are_refused_at_preflight_naming_their_key(extra, message, short_tmp):
    p = run_render("lab", short_tmp, "-e", json.dumps(extra()))
    assert p.returncode != 0
    assert message in p.stdout, p.stdout[-3000:]
    assert "Write the agent configuration" not in p.stdout  # refused before the template
    assert not any(os.path.exists(os.path.join(short_tmp, h, "etc", "agent.yml"))
                   for h in os.listdir(short_tmp))  # nothing was written


def check_unit(host_dir, cfg):
    """The hardened unit runs the agent on its config, may write its state directory
    (rendered outside /var/lib here) and reach exactly its block devices, or no device."""
    with open(os.path.join(host_dir, "replicator-agent.service")) as f:
        unit = f.read()
    install = os.path.join(os.path.dirname(host_dir), "install")
    assert (f"ExecStart={install}/venv/bin/replicator agent -c {host_dir}/etc/agent.yml\n"
            in unit)
    assert "ProtectSystem=strict" in unit and f"ReadWritePaths={host_dir}/state\n" in unit
    devices = sorted(v.path for g in cfg.groups for v in g.volumes if v.path.startswith("/dev/"))
    allowed = sorted(line.split("=")[1].split()[0] for line in unit.splitlines()
                     if line.startswith("DeviceAllow="))
    assert allowed == devices
    assert ("PrivateDevices=yes" in unit) == (not devices)
