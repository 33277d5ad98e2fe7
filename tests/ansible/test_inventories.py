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


def render(name, tmp_path, *args):
    os.makedirs(os.path.join(tmp_path, "install"))
    os.symlink(os.path.dirname(BIN), os.path.join(tmp_path, "install", "venv"))
    p = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", f"inventories/{name}",
                        "tests/ansible/render_config.yml", "-e", f"render_dir={tmp_path}", *args],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
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
                (t["node"], t["mode"], t["compress"]) for t in expected[g.name]["targets"]]
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
