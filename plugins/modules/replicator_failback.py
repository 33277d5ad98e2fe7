#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""After a takeover, give a group's primary role back to the old primary."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_failback
short_description: Give the primary role back to the old primary once it rejoined
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator failback GROUP --to TO) on the current primary after a takeover. It
    waits until TO (the old primary, demoted to a replica of this host) has rejoined (only
    the regions changed on either side since the fork are sent), then switches the role back
    to it.
  - Nothing is done where the group is a secondary of TO already. Refused where the group is
    not primary, or when TO is not one of its targets.
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  to:
    description: The old primary.
    type: str
    required: true
  rejoin_timeout:
    description: Seconds to wait for its rejoin resync.
    type: float
    default: 600
  timeout:
    description: Seconds to drain the targets; writes wait meanwhile.
    type: float
    default: 60
"""

EXAMPLES = r"""
- name: Fail db back to dc1-app
  voltrail.replicator.replicator_failback:
    group: db
    to: dc1-app
    rejoin_timeout: 900
"""

RETURN = r"""
result:
  description: The answer of C(replicator failback --json) (the switchover's, and
    rejoin_bytes, volume_bytes).
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
                           rejoin_timeout=dict(type="float", default=600.0),
                           timeout=dict(type="float", default=60.0)),
        supports_check_mode=True,
    )
    p = module.params
    operate(module, ["failback", p["group"], "--to", p["to"], "--rejoin-timeout",
                     str(p["rejoin_timeout"]), "--timeout", str(p["timeout"])],
            handover_plan(p["group"], p["to"], "failback", replicating=False))


if __name__ == "__main__":
    main()
