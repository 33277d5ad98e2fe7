#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ship a group from this host to one more target."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_attach
short_description: Ship a group from this host to one more target
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator attach GROUP --target TARGET) (a re-parented replica, the old primary
    at failback). Nothing is done where the group ships to that node already; when it does
    with another mode or options, that link is kept as it is and a warning says so.
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  target:
    description: The target, C(NODE[:sync|async|periodic=INTERVAL][:zstd][:bunker][:block])
      (the mode defaults to async).
    type: str
    required: true
"""

EXAMPLES = r"""
- name: dc2-dr ships db on to dc3-arc
  voltrail.replicator.replicator_attach:
    group: db
    target: dc3-arc:async:zstd
"""

RETURN = r"""
result:
  description: The answer of C(replicator attach --json) (group, targets).
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
    AGENT_ARGS, GROUP_ARGS, canonical_spec, operate)


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **GROUP_ARGS, target=dict(type="str", required=True)),
        supports_check_mode=True,
    )
    name = module.params["group"]

    def plan(before, g):
        spec = canonical_spec(module.params["target"])
        node = spec.split(":", maxsplit=1)[0]
        current = next((t for t in before["targets"] if t.split(":", maxsplit=1)[0] == node), None)
        if current is None:
            return {**before, "role_from": "runtime", "targets": sorted(before["targets"] + [spec])}
        if current != spec:
            module.warn(f"group {name} ships to {node} already, as {current}, not {spec}: "
                        "that link is kept as it is")
        return None

    spec = module.params["target"]
    operate(module, ["attach", name, "--target", spec if ":" in spec else spec + ":async"], plan)


if __name__ == "__main__":
    main()
