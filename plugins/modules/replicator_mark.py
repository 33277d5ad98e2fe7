#!/usr/bin/python
"""Take a marker on the group's primary, or list a group's markers on this host."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_mark
short_description: A marker (a named point in the journal) on the primary, or the markers here
description:
  - With C(state=present), runs C(replicator mark GROUP NAME) on this host when the group is
    primary here, optionally between a freeze and a thaw command (application-consistent).
    A marker of that name that exists already is left alone (not changed). On a host where
    the group is not primary nothing is done (C(skipped) says why).
  - With C(state=listed), returns the group's markers on this host (a replica lists a marker
    once its records reached it).
  - In check mode nothing is marked.
extends_documentation_fragment: [voltrail.replicator.replicator_agent]
options:
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
    AGENT_ARGS, AgentError, call)


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
        _, listed = call(module, "markers", p["group"])
        markers = listed["markers"]
        if p["state"] == "listed":
            module.exit_json(changed=False, markers=markers)
        found = next((m for m in markers if m["name"] == p["name"]), None)
        if found is not None:
            module.exit_json(changed=False, marker={"group": p["group"], **found},
                             markers=markers)
        _, status = call(module, "status", p["group"])
        role = status["groups"][0]["role"]
        if role != "primary":
            module.exit_json(changed=False, markers=markers,
                             skipped=f"group {p['group']} is {role} on {status['node']}")
        if module.check_mode:
            module.exit_json(changed=True, markers=markers)
        args = ["mark", p["group"], p["name"], "--hook-timeout", str(p["hook_timeout"])]
        if p["freeze"]:
            args += ["--freeze", p["freeze"], "--thaw", p["thaw"]]
        _, marker = call(module, *args)
    except AgentError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=True, marker=marker, markers=markers + [marker])


if __name__ == "__main__":
    main()
