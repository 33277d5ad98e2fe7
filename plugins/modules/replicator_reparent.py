#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A replica of a group takes its records from a new source."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_reparent
short_description: A replica takes a group's records from another source from now on
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator reparent GROUP --source SOURCE) on a replica whose source was lost, or
    that was away during a switchover. SOURCE must be of the same line (where the replica
    stands decides whether it streams on or resyncs by checksum); a target of this host that
    becomes its source is dropped. Nothing is done where SOURCE is the source already; a
    primary has no source (an error).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  source:
    description: The new source.
    type: str
    required: true
"""

EXAMPLES = r"""
- name: dc3-arc takes db from dc2-dr, its old source dc1-app being lost
  voltrail.replicator.replicator_reparent:
    group: db
    source: dc2-dr
"""

RETURN = r"""
result:
  description: The answer of C(replicator reparent --json) (group, source, targets).
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
        if g["role"] == "primary":
            raise AgentError(f"group {name} is primary on {before['node']}: it has no source "
                             "(a primary follows another with replicator_demote)")
        if g["source"] == source:
            return None
        return {**before, "role_from": "runtime", "source": source,
                "targets": [t for t in before["targets"] if t.split(":")[0] != source]}

    operate(module, ["reparent", name, "--source", source], plan)


if __name__ == "__main__":
    main()
