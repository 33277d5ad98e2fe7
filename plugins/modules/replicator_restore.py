#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Back to the configured source and targets of a group, after a failback."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_restore
short_description: Back to the source and targets the agent's configuration gives a group
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator restore GROUP) where the group's source or targets were changed at
    runtime (a takeover, a failback, a reparent or an attach, status C(role_from=runtime)),
    once its role is where the configuration has it (refused otherwise; fail back or switch
    over first). Nothing is done where the group is as configured.
  - In check mode the source and targets it would take are not known (they are the
    configuration's), so the predicted state says C((as configured)).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
"""

EXAMPLES = r"""
- name: Every member takes its configured links again
  voltrail.replicator.replicator_restore:
    group: db
"""

RETURN = r"""
result:
  description: The answer of C(replicator restore --json) (group, role, source, targets, changed).
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
    AGENT_ARGS, GROUP_ARGS, operate)


def main():
    module = AnsibleModule(argument_spec=dict(**AGENT_ARGS, **GROUP_ARGS),
                           supports_check_mode=True)

    def plan(before, g):
        if before["role_from"] != "runtime":
            return None
        return {**before, "role_from": "config", "source": "(as configured)",
                "targets": ["(as configured)"]}

    operate(module, ["restore", module.params["group"]], plan)


if __name__ == "__main__":
    main()
