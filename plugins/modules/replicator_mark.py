#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Take a marker on the group's primary, or list a group's markers on this host."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_mark
short_description: A marker (a named point in the journal) on the primary, or the markers here
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - With C(state=present), runs C(replicator mark GROUP NAME) on this host when the group is
    primary here, optionally between a freeze and a thaw command (application-consistent).
    A marker of that name that exists already is left alone (not changed). On a host where
    the group is not primary nothing is done (C(skipped) says why).
  - With C(state=listed), returns the group's markers on this host (a replica lists a marker
    once its records reached it).
  - In check mode nothing is marked. The diff shows the names of the group's markers here
    before and after.
extends_documentation_fragment: [voltrail.replicator.replicator_agent]
options:
  group:
    description: The replication group.
    type: str
    required: true
  name:
    description: The marker's name (letters, digits, '.', '_', '-'; unique in the group).
    type: str
  state:
    description: C(present) takes the marker; C(listed) only lists the markers.
    type: str
    choices: [present, listed]
    default: present
  freeze:
    description: Shell command run on the host before the marker (e.g. C(fsfreeze -f /mnt)).
    type: str
  thaw:
    description: Shell command run after it, whatever happened (e.g. C(fsfreeze -u /mnt)).
    type: str
  hook_timeout:
    description: Seconds each hook may take (killed after).
    type: float
    default: 30
attributes:
  check_mode:
    description: Nothing is marked; C(changed) says whether a marker would be taken.
    support: full
  diff_mode:
    description: The names of the group's markers here, before and after.
    support: full
"""

EXAMPLES = r"""
- name: An application-consistent marker before the deploy
  voltrail.replicator.replicator_mark:
    group: db
    name: before-deploy-42
    freeze: fsfreeze -f /srv/db
    thaw: fsfreeze -u /srv/db

- name: The markers a replica holds
  voltrail.replicator.replicator_mark:
    group: db
    state: listed
  register: markers
"""

RETURN = r"""
marker:
  description: C({group, name, seq, time_ns, consistent}) of the marker taken or found.
  type: dict
  returned: state=present, on the primary
markers:
  description: The group's markers here, C({seq, name, time_ns, consistent, in_journal}).
  type: list
  elements: dict
  returned: success
skipped:
  description: Why nothing was done on this host (not the group's primary).
  type: str
  returned: when skipped
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, AgentError, call, diff)


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, group=dict(type="str", required=True),
                           name=dict(type="str"),
                           state=dict(type="str", choices=["present", "listed"],
                                      default="present"),
                           freeze=dict(type="str"), thaw=dict(type="str"),
                           hook_timeout=dict(type="float", default=30.0)),
        required_if=[("state", "present", ["name"])],
        required_together=[("freeze", "thaw")],
        supports_check_mode=True,
    )
    p = module.params
    try:
        listed = call(module, "markers", p["group"])
        markers = listed["markers"]
        if p["state"] == "listed":
            module.exit_json(changed=False, markers=markers)
        found = next((m for m in markers if m["name"] == p["name"]), None)
        if found is not None:
            module.exit_json(changed=False, marker={"group": p["group"], **found},
                             markers=markers)
        status = call(module, "status", p["group"])
        role = status["groups"][0]["role"]
        if role != "primary":
            module.exit_json(changed=False, markers=markers,
                             skipped=f"group {p['group']} is {role} on {status['node']}")
        names = [m["name"] for m in markers]
        shown = diff(module, {"markers": names}, {"markers": names + [p["name"]]})
        if module.check_mode:
            module.exit_json(changed=True, markers=markers, **shown)
        args = ["mark", p["group"], p["name"], "--hook-timeout", str(p["hook_timeout"])]
        if p["freeze"]:
            args += ["--freeze", p["freeze"], "--thaw", p["thaw"]]
        marker = call(module, *args)
    except AgentError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=True, marker=marker, markers=markers + [marker], **shown)


if __name__ == "__main__":
    main()
