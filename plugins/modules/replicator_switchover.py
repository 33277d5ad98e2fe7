#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planned move of a group's primary role from this host to one of its targets."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_switchover
short_description: Move a group's primary role from this host to a replicating target, no write lost
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator switchover GROUP --to TO) on the group's primary. The agent holds new
    writes, drains every target, names TO to the other targets as their new source, hands
    over after the last record, and this host becomes a secondary of TO.
  - Nothing is done where the group is a secondary of TO already (the switchover happened).
    Refused where the group is not primary, when TO is not one of its targets, or not
    replicating.
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  to:
    description: The target that becomes primary.
    type: str
    required: true
  timeout:
    description: Seconds to drain the targets; writes wait meanwhile.
    type: float
    default: 60
"""

EXAMPLES = r"""
- name: Move the primary of db to dc2-dr
  voltrail.replicator.replicator_switchover:
    group: db
    to: dc2-dr
    timeout: 30
"""

RETURN = r"""
result:
  description: The answer of C(replicator switchover --json) (group, from, to, seq, drained,
    reparent_needed, seconds).
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
    AGENT_ARGS, GROUP_ARGS, handover_plan, operate)


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **GROUP_ARGS, to=dict(type="str", required=True),
                           timeout=dict(type="float", default=60.0)),
        supports_check_mode=True,
    )
    p = module.params
    operate(module, ["switchover", p["group"], "--to", p["to"], "--timeout", str(p["timeout"])],
            handover_plan(p["group"], p["to"], "switchover", replicating=True))


if __name__ == "__main__":
    main()
