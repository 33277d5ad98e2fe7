#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Resync this host's outgoing links, or change their resync rate."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_resync
short_description: Start a resync of this host's outgoing links, or set their resync rate
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Runs C(replicator resync GROUP TARGET) on the node that ships to TARGET. With I(mode)
    C(full) every region is sent again, with C(checksum) only regions whose hashes differ,
    with C(assume-clean) none (the target is declared identical); without I(mode) no resync
    is forced (the agent resyncs what an outage left dirty by itself) and only I(rate) is
    applied. Does not wait (see replicator_wait).
  - In check mode nothing is changed; the diff shows each selected link's state and rate
    limit before and after (predicted in check mode).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.links]
options:
  mode:
    description: What to resync; omit it to force none.
    type: str
    choices: [full, checksum, assume-clean]
  rate:
    description: Resync rate limit in bytes per second (C(50MiB), C(0) = unlimited); unchanged if omitted.
    type: str
attributes:
  check_mode:
    description: Nothing is changed; C(changed) and the diff say what would be.
    support: full
  diff_mode:
    description: Each selected link's C(state) and C(rate_limit_bytes_per_s), before and after.
    support: full
"""

EXAMPLES = r"""
- name: Resync the regions of dc3-arc whose hashes differ, at most 50 MiB/s
  voltrail.replicator.replicator_resync:
    group: db
    targets: [dc3-arc]
    mode: checksum
    rate: 50MiB

- name: Lift the resync rate limit of every link of this host
  voltrail.replicator.replicator_resync:
    rate: "0"
"""

RETURN = r"""
results:
  description: The command's answer per link (group, target, state, rate_limit_bytes_per_s, ...).
  type: list
  elements: dict
  returned: success
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, LINK_ARGS, AgentError, call, diff, parse_rate, select)


def rate_view(answers: list[dict]) -> dict:
    """The diff's view of resync answers: state and rate limit per GROUP -> TARGET."""
    return {f"{r['group']} -> {r['target']}": {"state": r["state"],
                                               "rate_limit_bytes_per_s": r["rate_limit_bytes_per_s"]}
            for r in answers}


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **LINK_ARGS,
                           mode=dict(type="str", choices=["full", "checksum", "assume-clean"]),
                           rate=dict(type="str")),
        supports_check_mode=True,
    )
    p = module.params
    changed, results, before, after = False, [], [], []
    try:
        rate = parse_rate(p["rate"]) if p["rate"] is not None else None
        status = call(module, "status")
        for group, target in select(status, p["group"], p["targets"]):
            args = ["resync", group["name"], target["node"]]
            current = call(module, *args)  # without options: shows, changes nothing
            before.append(current)
            flags = [f"--{p['mode']}"] if p["mode"] else []
            if rate is not None and current.get("rate_limit_bytes_per_s") != rate:
                flags += ["--rate", str(rate)]
            if not flags:
                results.append(current)
                after.append(current)
                continue
            changed = True
            results.append(current if module.check_mode else call(module, *args, *flags))
            after.append({**current, **({"rate_limit_bytes_per_s": rate} if rate is not None else {}),
                          **({"state": "resyncing"} if p["mode"] else {})}
                         if module.check_mode else results[-1])
    except AgentError as exc:
        module.fail_json(msg=str(exc), results=results)
    module.exit_json(changed=changed, results=results,
                     **diff(module, rate_view(before), rate_view(after)))


if __name__ == "__main__":
    main()
