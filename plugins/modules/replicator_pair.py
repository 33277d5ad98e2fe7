#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Establish this host's outgoing links: start the initial sync a link needs."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_pair
short_description: Start the initial sync of this host's outgoing links where one is needed
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - A new target gets its initial sync from the agent by itself (a full resync, or nothing when
    both sides are blank at seq 0). This module asks for another kind with
    C(replicator resync GROUP TARGET --checksum|--assume-clean) while that initial sync is
    pending, and resolves a target in C(needs-resync) (its history diverged) with the chosen
    kind, which overwrites the target; that is refused while I(safe_mode) is true.
    It does not wait (see replicator_wait).
  - In check mode nothing is started; the diff shows each selected link's state and resync
    before and after (predicted in check mode).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.links]
options:
  initial_sync:
    description: C(full) copies every region, C(checksum) only regions whose hashes differ
      (a target seeded from a backup), C(assume-clean) declares both sides identical (blank volumes).
    type: str
    choices: [full, checksum, assume-clean]
    default: full
  safe_mode:
    description: Refuse to overwrite a target whose history diverged (C(needs-resync)).
    type: bool
    default: true
attributes:
  check_mode:
    description: Nothing is started; C(changed) and the diff say what would be.
    support: full
  diff_mode:
    description: Each selected link's C(state) and C(resync) kind, before and after.
    support: full
"""

EXAMPLES = r"""
- name: The links of a target seeded from a backup sync only the regions that differ
  voltrail.replicator.replicator_pair:
    group: db
    targets: [dc3-arc]
    initial_sync: checksum

- name: Overwrite a target whose history diverged (it loses what only it holds)
  voltrail.replicator.replicator_pair:
    group: db
    targets: [dc2-dr]
    safe_mode: false
"""

RETURN = r"""
links:
  description: The selected links before any action, as replicator_status returns them.
  type: list
  elements: dict
  returned: success
started:
  description: Targets whose initial sync this call started or changed, with the command's answer.
  type: list
  elements: dict
  returned: success
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, LINK_ARGS, AgentError, call, diff, link, select)

FLAGS = {mode: f"--{mode}" for mode in ("full", "checksum", "assume-clean")}


def wanted(lk: dict, initial_sync: str) -> bool:
    """Does this link need a resync command to get the initial sync asked for?"""
    if lk["state"] == "needs-resync":
        return True
    resync = lk.get("resync") or {}
    # an initial sync the agent started by itself, of another kind than asked for
    return bool(resync.get("initial")) and resync.get("mode", "full") != initial_sync


def sync_view(links: list[dict], started=(), initial_sync=None) -> dict:
    """The diff's view of links: state and resync kind per GROUP -> TARGET; `started`
    (check mode) are shown as the initial sync asked for would leave them."""
    view = {}
    for lk in links:
        resync = lk.get("resync") or {}
        view[f"{lk['group']} -> {lk['target']}"] = {"state": lk["state"],
                                                    "resync": resync.get("mode")}
    for lk in started:
        view[f"{lk['group']} -> {lk['target']}"] = (
            {"state": "replicating", "resync": None} if initial_sync == "assume-clean"
            else {"state": "resyncing", "resync": initial_sync})
    return view


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **LINK_ARGS,
                           initial_sync=dict(type="str", choices=list(FLAGS), default="full"),
                           safe_mode=dict(type="bool", default=True)),
        supports_check_mode=True,
    )
    p = module.params
    try:
        status = call(module, "status")
        links = [link(status, g, t) for g, t in select(status, p["group"], p["targets"])]
        todo = [lk for lk in links if wanted(lk, p["initial_sync"])]
        diverged = [lk for lk in todo if lk["state"] == "needs-resync"]
        if diverged and p["safe_mode"]:
            module.fail_json(links=links, msg=(
                "the history of " + ", ".join(f"{lk['target']} ({lk['group']})" for lk in diverged)
                + f" diverged from {status['node']}'s: an initial sync would overwrite it. Check "
                "which side holds the data you want; to overwrite the target, re-run with "
                "safe_mode false (playbooks: -e replicator_pair_safe_mode=false)"))
        started = []
        for lk in todo:
            if not module.check_mode:
                answer = call(module, "resync", lk["group"], lk["target"], FLAGS[p["initial_sync"]])
                started.append(answer)
            else:
                started.append({"group": lk["group"], "target": lk["target"]})
        if todo and not module.check_mode:
            status = call(module, "status")
            after = sync_view([link(status, g, t) for g, t in select(status, p["group"],
                                                                     p["targets"])])
        else:
            after = sync_view(links, todo, p["initial_sync"])
    except AgentError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=bool(todo), links=links, started=started,
                     **diff(module, sync_view(links), after))


if __name__ == "__main__":
    main()
