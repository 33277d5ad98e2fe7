#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read the status of the agent on this host."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_status
short_description: Status of the replicator agent on this host, and its outgoing links
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator status --json) against the agent named by I(config). Read-only.
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.links]
options:
  group:
    description: Only this group's links in C(links) (C(status) is always complete).
    type: str
  targets:
    description: Only the links to these nodes in C(links).
    type: list
    elements: str
  timeout:
    description: Seconds to keep asking while the agent does not answer (it may be starting).
    type: float
    default: 0
  analytics:
    description: Also return C(analytics), the replication tree of every group as
      C(replicator status --analytics) prints it (every node below this one, its lag and
      the analytics of what it applied).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Status of the agent, waiting up to 30 s for it to answer
  voltrail.replicator.replicator_status:
    timeout: 30
  register: agent

- name: The links of db to dc3-arc, and the replication tree
  voltrail.replicator.replicator_status:
    group: db
    targets: [dc3-arc]
    analytics: true
"""

RETURN = r"""
status:
  description: The agent's status document (node, pid, uptime_seconds, groups).
  type: dict
  returned: success
links:
  description: This host's outgoing links (group, source, target, mode, state, lag, journal use...).
  type: list
  elements: dict
  returned: success
analytics:
  description: The replication tree of each group, as text.
  type: str
  returned: when analytics is true
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, LINK_ARGS, AgentError, call, link, select)


def main():
    module = AnsibleModule(argument_spec=dict(**AGENT_ARGS, **LINK_ARGS,
                                              timeout=dict(type="float", default=0),
                                              analytics=dict(type="bool", default=False)),
                           supports_check_mode=True)
    deadline = time.monotonic() + module.params["timeout"]
    try:
        while True:
            try:
                status = call(module, "status")
                break
            except AgentError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        links = [link(status, g, t) for g, t in select(status, module.params["group"],
                                                       module.params["targets"])]
    except AgentError as exc:
        module.fail_json(msg=str(exc))
    extra = {}
    if module.params["analytics"]:
        cmd = [module.params["cli"], "status", "--analytics", "-c", module.params["config"]]
        rc, out, err = module.run_command(cmd)
        if rc:
            module.fail_json(msg=f"{' '.join(cmd)}: exit {rc}: {(err or out).strip()}")
        extra["analytics"] = out.rstrip()
    module.exit_json(changed=False, status=status, links=links, **extra)


if __name__ == "__main__":
    main()
