#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Make this host's primary of a group a secondary of another node."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_demote
short_description: Make this host a secondary of a group's (new) primary
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator demote GROUP --source SOURCE) where the group is primary (an old
    primary back after a takeover, which rejoins as a replica of SOURCE, and what it wrote that
    never reached SOURCE is saved, then rolled back) or a secondary of another node (it takes
    records from SOURCE from now on). Nothing is done where it is a secondary of SOURCE.
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  source:
    description: The node that is (or becomes) the primary.
    type: str
    required: true
"""

EXAMPLES = r"""
- name: The old primary follows the promoted replica
  voltrail.replicator.replicator_demote:
    group: db
    source: dc3-arc
"""

RETURN = r"""
result:
  description: The answer of C(replicator demote --json) (group, role, source, changed).
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
        argument_spec=dict(**AGENT_ARGS, **GROUP_ARGS, source=dict(type="str", required=True)),
        supports_check_mode=True,
    )
    name, source = module.params["group"], module.params["source"]

    def plan(before, g):
        if g["role"] == "secondary":
            if g["source"] == source:
                return None
            targets = [t for t in before["targets"] if t.split(":")[0] != source]
        elif g["role"] == "primary":
            targets = []  # the new primary ships to the others
        else:
            raise AgentError(f"group {name} is {g['role']} on {before['node']}: only a primary "
                             "or a secondary is demoted")
        return {**before, "role": "secondary", "role_from": "runtime", "source": source,
                "targets": targets}

    operate(module, ["demote", name, "--source", source], plan)


if __name__ == "__main__":
    main()
