#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Resolve a split brain on the losing node: give up its writes since the split."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_resolve
short_description: Split brain, on the losing node, give up its writes since the split
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator resolve GROUP --discard-local --survivor SURVIVOR) on the node whose
    writes since the split are given up; a primary is demoted to a secondary of SURVIVOR,
    whose line wins when it connects. Those writes are not lost outright; before the
    survivor's data replaces them the agent keeps them under the group's directory in its
    C(state_dir) (C(diverged-FORK-TIME/), its C(index.json) and C(regions.bin), or a copy of
    every volume); the status lists these directories in C(discarded).
  - Nothing is done where there is no split brain and the group is a secondary of SURVIVOR
    (resolved). Without a split brain otherwise, it is an error (nothing to resolve, and this
    would demote a healthy primary).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  survivor:
    description: The node whose data wins.
    type: str
    required: true
  discard_local:
    description: Must be true, to say that this node's writes since the split are given up.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: dc1-app gives up what it wrote while cut off; dc3-arc's data wins
  voltrail.replicator.replicator_resolve:
    group: db
    survivor: dc3-arc
    discard_local: true
"""

RETURN = r"""
result:
  description: The answer of C(replicator resolve --json) (group, role, survivor, split_brain).
  type: dict
  returned: changed and not check mode
state:
  description: The group here after the operation (predicted in check mode) as the diff shows it.
  type: dict
  returned: success
links:
  description: The group's outgoing links here, as replicator_status returns them.
  type: list
  elements: dict
  returned: success
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, GROUP_ARGS, AgentError, operate)


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **GROUP_ARGS, survivor=dict(type="str", required=True),
                           discard_local=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    name, survivor = module.params["group"], module.params["survivor"]
    if not module.params["discard_local"]:
        module.fail_json(msg="resolve gives up this node's writes since the split (the agent "
                         "keeps them in a file): say so with discard_local true")

    def plan(before, g):
        if not before["split_brain"]:
            if g["role"] == "secondary" and g["source"] == survivor:
                return None
            raise AgentError(f"group {name} is in no split brain on {before['node']} (it is "
                             f"{g['role']}" + (f" of {g['source']}" if g["source"] else "")
                             + "): nothing to resolve")
        return {**before, "role": "secondary", "role_from": "runtime", "source": survivor,
                "split_brain": None,
                "targets": [] if g["role"] == "primary" else before["targets"]}

    operate(module, ["resolve", name, "--discard-local", "--survivor", survivor], plan)


if __name__ == "__main__":
    main()
