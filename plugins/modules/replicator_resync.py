#!/usr/bin/python
"""Resync this host's outgoing links, or change their resync rate."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_resync
short_description: Start a resync of this host's outgoing links, or set their resync rate
description:
  - Runs C(replicator resync GROUP TARGET) on the node that ships to TARGET. With I(mode)
    C(full) every region is sent again, with C(checksum) only regions whose hashes differ,
    with C(assume-clean) none (the target is declared identical); without I(mode) no resync
    is forced (the agent resyncs what an outage left dirty by itself) and only I(rate) is
    applied. Does not wait (see replicator_wait).
extends_documentation_fragment: [voltrail.replicator.replicator_agent]
options:
  mode:
    description: What to resync; omit it to force none.
    type: str
    choices: [full, checksum, assume-clean]
  rate:
    description: Resync rate limit in bytes per second (C(50MiB), C(0) = unlimited); unchanged if omitted.
    type: str
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
    AGENT_ARGS, LINK_ARGS, AgentError, call, parse_rate, select)


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **LINK_ARGS,
                           mode=dict(type="str", choices=["full", "checksum", "assume-clean"]),
                           rate=dict(type="str")),
        supports_check_mode=True,
    )
    p = module.params
    changed, results = False, []
    try:
        rate = parse_rate(p["rate"]) if p["rate"] is not None else None
        _, status = call(module, "status")
        for group, target in select(status, p["group"], p["targets"]):
            args = ["resync", group["name"], target["node"]]
            _, current = call(module, *args)  # without options: shows, changes nothing
            flags = [f"--{p['mode']}"] if p["mode"] else []
            if rate is not None and current.get("rate_limit_bytes_per_s") != rate:
                flags += ["--rate", str(rate)]
            if not flags:
                results.append(current)
                continue
            changed = True
            results.append(current if module.check_mode else call(module, *args, *flags)[1])
    except AgentError as exc:
        module.fail_json(msg=str(exc), results=results)
    module.exit_json(changed=changed, results=results)


if __name__ == "__main__":
    main()
