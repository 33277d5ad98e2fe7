"""The Ansible side (plugins/, run on the controller and shipped to hosts by Ansible)
cannot import the agent's package, so the few things both sides must say alike are
written in both; this keeps them alike: the topology vocabulary the inventory is checked
against is the one the agent's config parser accepts, and byte counts read the same in
`replicator status` and in the playbooks' progress lines."""

import importlib.util
import os

import pytest

from replicator import config, sizes
from tests.ansible.ansible_harness import ROOT, module_utils


def _topology():
    path = os.path.join(ROOT, "plugins", "filter", "replicator_topology.py")
    spec = importlib.util.spec_from_file_location("replicator_topology_vocabulary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_inventory_is_checked_against_the_agents_vocabulary():
    topo = _topology()
    assert topo.NAME_RE.pattern == config.NAME_RE.pattern
    assert topo.MODES == config.MODES
    assert topo.LINK_CHOICES == {"compress": config.COMPRESSIONS,
                                 "initial_sync": config.RESYNC_MODES,
                                 "on_disconnect": config.ON_DISCONNECT}
    for key, choices in topo.LINK_CHOICES.items():  # first = the agent's default
        assert config.TargetConfig.__dataclass_fields__[key].default == choices[0], key


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1536, 10 << 20, (1 << 40) - 1, 5 << 40, 7.5])
def test_byte_counts_read_the_same_in_the_cli_and_in_ansible(n):
    assert module_utils("replicator_agent").human_bytes(n) == sizes.human_bytes(n)
