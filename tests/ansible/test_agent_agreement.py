"""The Ansible side and the agent must say some things alike. The topology filters check
values with the agent's own parser (config.py, which the collection ships), so what is
left to keep alike is the vocabulary: every key the agent reads in a group, a volume or a
target can be set from the inventory, or is one the role derives from the topology; every
node-wide key (and every key of its tls section) is one the role renders; and byte counts
read the same in `replicator status` and in the playbooks' progress lines."""

import os

import pytest
import yaml

from replicator import config, sizes
from tests.ansible.ansible_harness import ROOT, filter_module, module_utils

TOPOLOGY = filter_module("replicator_topology")
# keys of the agent's config that the role works out from the topology, not set directly
DERIVED = {"group": {"name", "role", "source", "volumes", "targets", "bunker", "members",
                     "link_keys", "retain", "apply_delay"},  # the last two: from a link
           "volume": set(), "target": {"node"}}


def _keys_the_agent_reads(monkeypatch) -> dict:
    """{"group"|"volume"|"target": keys} the parser reads in each, from a parse of a
    config that has every section (the readers' `seen` sets: what they looked up)."""
    read = {"group": set(), "volume": set(), "target": set(), "node": set(), "tls": set(),
            "nbd_client": set()}
    done = config._Reader.done

    def record(self):
        kind = ("target" if ".targets[" in self.path else "volume" if ".volumes[" in self.path
                else "group" if self.path.startswith("groups[") else "node" if self.path == ""
                else "tls" if self.path == "tls"
                else "nbd_client" if self.path.startswith("nbd_clients.") else None)
        if kind:
            read[kind] |= self.seen
        done(self)

    monkeypatch.setattr(config._Reader, "done", record)
    config.parse({
        "node": "a", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
        "nbd_tls_listen": "127.0.0.1:5", "nbd_socket": "/run/r/nbd.sock",
        "nbd_clients": {"replicator-drill": {"exports": "*", "access": "rw"}},
        "tls": {"ca": "/p/ca.crt", "cert": "/p/a.crt", "key": "/p/a.key", "crl": "/p/crl.pem"},
        "peers": {"b": "127.0.0.1:3", "c": "127.0.0.1:4"},
        "groups": [
            {"name": "db", "role": "primary", "source": None,
             "volumes": [{"name": "v", "path": "/v.img", "size": "1MiB"}],
             "targets": [{"node": "b", "mode": "async"}]},
            {"name": "files", "role": "primary", "source": None,
             "volumes": [{"name": "w", "path": "/w.img", "size": "1MiB", "capture": "watch"}],
             "targets": [{"node": "b", "mode": "periodic", "interval": 30}]},
            {"name": "far", "role": "secondary", "source": "b",
             "volumes": [{"name": "x", "path": "/x.img", "size": "1MiB"}]},
        ]})
    return read


def test_every_key_the_agent_reads_can_be_set_from_the_inventory(monkeypatch):
    read = _keys_the_agent_reads(monkeypatch)
    settable = {"group": set(TOPOLOGY.GROUP_CONFIG_KEYS) | set(TOPOLOGY.WATCH_KEYS),
                "volume": set(TOPOLOGY.VOLUME_KEYS),
                "target": set(TOPOLOGY.TARGET_KEYS)}
    for kind in settable:
        assert read[kind] - DERIVED[kind] == settable[kind], kind
    # and a link's replica keys are the group keys of its target
    assert set(TOPOLOGY.REPLICA_KEYS) <= read["group"]


def test_every_node_wide_key_the_agent_reads_is_rendered_by_the_role(monkeypatch):
    """The role's __replicator_agent_settings has every top-level key the parser reads
    (the NBD listeners and grants among them), and its tls section every file the parser
    reads (crl only when a CRL exists: replicator_agent_tls_crl)."""
    read = _keys_the_agent_reads(monkeypatch)
    with open(os.path.join(ROOT, "roles", "replicator_agent", "vars", "main.yml")) as f:
        role = yaml.safe_load(f)
    assert read["node"] == set(role["__replicator_agent_settings"])
    assert read["tls"] == set(role["__replicator_agent_tls_files"]) | {"crl"}
    assert "replicator_agent_tls_crl" in role["__replicator_agent_tls_config"]
    # the keys the role drops when they are empty (off) are the agent's optional ones
    assert set(role["__replicator_agent_optional_keys"]) <= read["node"]
    # a grant of replicator_agent_nbd_clients goes to the agent as it is: its keys are these
    assert read["nbd_client"] == {"exports", "access"}


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1536, 10 << 20, (1 << 40) - 1, 5 << 40, 7.5])
def test_byte_counts_read_the_same_in_the_cli_and_in_ansible(n):
    assert module_utils("replicator_agent").human_bytes(n) == sizes.human_bytes(n)
