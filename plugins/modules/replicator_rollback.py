#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Undo an interrupted resync on this replica: back to its last consistent image."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_rollback
short_description: Undo an interrupted resync on a replica, back to its last consistent image
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator rollback GROUP) where the group is inconsistent (a resync from its
    source was interrupted, the source lost); every region the resync overwrote is put back,
    so that the volumes hold the last consistent image again (which a takeover can then
    promote). Every write the resync brought since that image is undone. Nothing is done where
    the group is consistent. Refused while the source is connected (it is resyncing it),
    unless I(force).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  force:
    description: Roll back even while the source is connected.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Back to the last consistent image of db
  voltrail.replicator.replicator_rollback:
    group: db
"""

RETURN = r"""
result:
  description: The answer of C(replicator rollback --json) (group, regions_restored,
    consistent_seq).
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
        argument_spec=dict(**AGENT_ARGS, **GROUP_ARGS, force=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    name, force = module.params["group"], module.params["force"]

    def plan(before, g):
        if not before["inconsistent"]:
            return None
        if g["upstream"] and not force:
            raise AgentError(f"group {name}: the source {g['source']} is still connected and "
                             "resyncing; stop it first, or force")
        return {**before, "inconsistent": False}

    operate(module, ["rollback", name] + ["--force"] * force, plan)


if __name__ == "__main__":
    main()
