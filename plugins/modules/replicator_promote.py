#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Promote this host's replica of a group to primary (takeover), or a copy of it (drill)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_promote
short_description: Make this host's replica of a group its primary (takeover), or promote a copy
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator promote GROUP) on a secondary whose primary is lost. It first replays
    from the group's bunker (I(bunker), or the group's C(bunker) key) every record it lacks,
    so that no acknowledged write is lost, then starts a new generation and ships to its
    current targets plus I(targets).
  - Nothing is done where the group is primary already and ships to every target of
    I(targets) as given. A primary that does not is an error (add a link with
    M(voltrail.replicator.replicator_attach)), as is a replica whose source is still
    connected (a planned move is M(voltrail.replicator.replicator_switchover)), unless
    I(force).
  - With I(copy), the replica is left alone and a writable copy of it is made in that
    directory, brought forward from the bunker (a DR drill); that always changes something.
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.operation]
options:
  force:
    description: Promote even while the source is connected, or an inconsistent or
      split-brained image, or when the bunker cannot be replayed.
    type: bool
    default: false
  bunker:
    description: Replay this bunker's journal first (default the group's C(bunker) key).
    type: str
  no_bunker:
    description: Replay from no bunker (accept losing what only it holds).
    type: bool
    default: false
  targets:
    description: Ship to these nodes too once primary, each as
      C(NODE:sync|async|periodic=INTERVAL[:zstd][:bunker][:block]).
    type: list
    elements: str
  at:
    description: Take over at this point of the replica's window (a seq, a time like
      C(2026-12-02T05:10:00Z) or C(-15m), or a marker), before a logical corruption; later
      records are set aside, not applied, and no bunker is replayed. The source must be gone,
      even with I(force).
    type: str
  copy:
    description: Promote a copy instead, in this new (or empty) directory; the replica goes on
      replicating.
    type: path
"""

EXAMPLES = r"""
- name: Take over db on the far replica, replaying the bunker first
  voltrail.replicator.replicator_promote:
    group: db
    targets: ["dc1-app:async"]

- name: Take over at the marker before the bad deploy
  voltrail.replicator.replicator_promote:
    group: db
    at: before-deploy-42

- name: DR drill, a writable copy of the replica
  voltrail.replicator.replicator_promote:
    group: db
    copy: /srv/drill/db
"""

RETURN = r"""
result:
  description: The answer of C(replicator promote --json) (group, role, generation, seq,
    targets, bunker_replay, rpo_records; at, kept with I(at); copy with I(copy)).
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

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, GROUP_ARGS, AgentError, canonical_spec, operate)


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **GROUP_ARGS, force=dict(type="bool", default=False),
                           bunker=dict(type="str"), no_bunker=dict(type="bool", default=False),
                           targets=dict(type="list", elements="str"), at=dict(type="str"),
                           copy=dict(type="path")),
        mutually_exclusive=[("at", "copy"), ("bunker", "no_bunker"), ("copy", "targets")],
        supports_check_mode=True,
    )
    p, name = module.params, module.params["group"]

    def plan(before, g):
        if g["role"] not in ("primary", "secondary"):
            raise AgentError(f"group {name} is {g['role']} on {before['node']}; only a "
                             "secondary is promoted")
        if p["copy"]:
            if g["role"] != "secondary":
                raise AgentError(f"group {name} is primary on {before['node']}; only a "
                                 "secondary's copy is promoted")
            if os.path.isdir(p["copy"]) and os.listdir(p["copy"]):
                raise AgentError(f"copy of group {name} into {p['copy']}: not empty")
            return before  # a new copy; the group stays as it is
        wanted = [canonical_spec(spec) for spec in p["targets"] or []]
        if g["role"] == "primary":
            missing = sorted(set(wanted) - set(before["targets"]))
            if missing:
                raise AgentError(
                    f"group {name} is primary on {before['node']} already, shipping to "
                    f"{', '.join(before['targets']) or 'nobody'}, not {', '.join(missing)}: "
                    "add a link with replicator_attach")
            return None
        if g["upstream"] and (p["at"] or not p["force"]):
            raise AgentError(f"group {name}: its source {g['source']} is still connected; a "
                             "planned move is replicator_switchover on the primary"
                             + ("" if p["at"] else " (or force)"))
        if not p["force"] and (before["inconsistent"] or before["split_brain"]):
            raise AgentError(
                f"group {name} is inconsistent on {before['node']} (a resync was interrupted); "
                "roll it back first (replicator_rollback), or force" if before["inconsistent"]
                else f"group {name} is in split brain with {before['split_brain']}; resolve it "
                "first (replicator_resolve), or force")
        nodes = {spec.split(":")[0] for spec in wanted}
        return {**before, "role": "primary", "role_from": "runtime", "source": None,
                "generation": "(new)", "inconsistent": False,
                "targets": sorted([t for t in before["targets"] if t.split(":")[0] not in nodes]
                                  + wanted)}

    command = ["promote", name]
    command += ["--force"] * p["force"] + ["--no-bunker"] * p["no_bunker"]
    command += ["--bunker", p["bunker"]] if p["bunker"] else []
    command += ["--at", p["at"]] if p["at"] else []
    command += ["--copy", p["copy"]] if p["copy"] else []
    command += [f"--target={spec}" for spec in p["targets"] or []]
    operate(module, command, plan)


if __name__ == "__main__":
    main()
