#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verify this host's outgoing links online: compare source and replica region by region."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_verify
short_description: Online verify of this host's outgoing links, with optional repair
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator verify GROUP TARGET [--repair]) on the node that ships to TARGET, for
    every selected link, and returns what it found. Mismatches are not a module failure (a
    playbook decides; see playbooks/verify.yml); an error of the command is. In check mode
    the verify runs without repair (it only reads). The diff shows the mismatching regions
    per link before and after the repair (predicted in check mode, none left).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.links]
options:
  repair:
    description: Resync the mismatching regions found.
    type: bool
    default: false
attributes:
  check_mode:
    description: The verify runs without repair; C(changed) says whether a repair would.
    support: full
  diff_mode:
    description: Mismatching regions per link, before and after the repair.
    support: full
"""

EXAMPLES = r"""
- name: Compare every replica of this host with its source
  voltrail.replicator.replicator_verify:
  register: verified
  failed_when: verified.mismatches > 0

- name: Verify the link to dc3-arc and resync what differs
  voltrail.replicator.replicator_verify:
    group: db
    targets: [dc3-arc]
    repair: true
"""

RETURN = r"""
results:
  description: Per link, C({group, target, bytes_checked, mismatches:[{volume, offset, length}], repaired}).
  type: list
  elements: dict
  returned: success
mismatches:
  description: Number of mismatching regions over all selected links.
  type: int
  returned: success
lines:
  description: What was found, for people; one line per link, then one per mismatching region.
  type: list
  elements: str
  returned: success
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, LINK_ARGS, AgentError, call, diff, human_bytes, select)

EXIT_MISMATCH = 3


def report(source: str, results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        found = r.get("mismatches") or []
        lines.append(f"{r['group']} {source} -> {r['target']}: {human_bytes(r.get('bytes_checked', 0))} "
                     f"checked, {len(found)} mismatching region(s)"
                     + (f", {r['repaired']} repaired" if r.get("repaired") else ""))
        lines += [f"  {m['volume']} offset {m['offset']} length {m['length']}" for m in found]
    return lines


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **LINK_ARGS, repair=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    p = module.params
    repair = p["repair"] and not module.check_mode
    results = []
    try:
        status = call(module, "status")
        for group, target in select(status, p["group"], p["targets"]):
            args = ["verify", group["name"], target["node"]] + (["--repair"] if repair else [])
            found = call(module, *args, ok_rcs=(0, EXIT_MISMATCH))
            results.append(found)
    except AgentError as exc:
        module.fail_json(msg=str(exc), results=results)
    mismatches = sum(len(r.get("mismatches") or []) for r in results)
    changed = any(r.get("repaired") for r in results) or (
        module.check_mode and p["repair"] and mismatches > 0)
    before = {f"{r['group']} -> {r['target']}": len(r.get("mismatches") or []) for r in results}
    after = {key: 0 if p["repair"] else found for key, found in before.items()} \
        if module.check_mode else \
        {f"{r['group']} -> {r['target']}": len(r.get("mismatches") or []) - (r.get("repaired") or 0)
         for r in results}
    module.exit_json(changed=bool(changed), results=results, mismatches=mismatches,
                     lines=report(status["node"], results), **diff(module, before, after))


if __name__ == "__main__":
    main()
