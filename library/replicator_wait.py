#!/usr/bin/python
"""Wait (a bounded while) for this host's outgoing links to reach a state."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_wait
short_description: Wait until this host's outgoing links are replicating
description:
  - Polls the agent's status for up to I(timeout) seconds and returns as soon as every
    selected link is in I(state). Returns C(done=false) (not a failure) when time runs out,
    so a playbook can call it in an C(until) loop and show C(lines) as progress. Fails at once
    when a link is C(refused) (the peer's configuration does not accept this node). Read-only.
extends_documentation_fragment: [replicator_agent]
options:
  state:
    description: The state to wait for.
    type: str
    default: replicating
  timeout:
    description: Seconds to wait in this call.
    type: float
    default: 5
"""

RETURN = r"""
done:
  description: Every selected link is in I(state).
  type: bool
  returned: success
links:
  description: The selected links as last seen.
  type: list
  elements: dict
  returned: success
lines:
  description: One progress line per link.
  type: list
  elements: str
  returned: success
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.replicator_agent import (AGENT_ARGS, LINK_ARGS, AgentError, call, link,
                                                   progress_line, select)

POLL_SECONDS = 0.25


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **LINK_ARGS,
                           state=dict(type="str", default="replicating"),
                           timeout=dict(type="float", default=5)),
        supports_check_mode=True,
    )
    p = module.params
    deadline = time.monotonic() + p["timeout"]
    while True:
        try:
            _, status = call(module, "status")
            links = [link(status, g, t) for g, t in select(status, p["group"], p["targets"])]
        except AgentError as exc:
            module.fail_json(msg=str(exc))
        lines = [progress_line(lk) for lk in links]
        refused = [lk for lk in links if lk["state"] == "refused" and p["state"] != "refused"]
        if refused:
            module.fail_json(msg="refused by the target: " + "; ".join(
                progress_line(lk) for lk in refused), links=links, lines=lines)
        done = all(lk["state"] == p["state"] for lk in links)
        if done or time.monotonic() >= deadline:
            module.exit_json(changed=False, done=done, links=links, lines=lines)
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    main()
