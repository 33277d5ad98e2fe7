#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Wait (a bounded while) for this host's outgoing links to reach a state."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_wait
short_description: Wait until this host's outgoing links are replicating
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Waits up to I(timeout) seconds and returns as soon as every selected link is in
    I(state). Returns C(done=false) (not a failure) when time runs out, so a playbook can
    call it in an C(until) loop and show C(lines) as progress. Fails at once when a link is
    C(refused) (the peer's configuration does not accept this node). Read-only.
  - Reads the agent's status, then follows its event stream from the status's C(event_seq)
    (C(replicator events --follow --since SEQ --json)), so no change between the two is
    missed, and reads the status again only when a selected link changed state. It polls
    the status instead when the agent has no event stream, when the stream ends, or with
    I(follow_events=false).
extends_documentation_fragment: [voltrail.replicator.replicator_agent, voltrail.replicator.replicator_agent.links]
options:
  state:
    description: The state to wait for.
    type: str
    default: replicating
  timeout:
    description: Seconds to wait in this call.
    type: float
    default: 5
  follow_events:
    description: Follow the agent's event stream (C(false) polls the status every 0.25 s).
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Until every link of db replicates, showing progress every 5 s (10 min at most)
  voltrail.replicator.replicator_wait:
    group: db
    timeout: 5
  register: waited
  until: waited.done
  retries: 120
  delay: 0
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
watched:
  description: How the call waited, C(events) (the agent's event stream), C(polling), or
    C(none) when the links were in I(state) at once.
  type: str
  returned: success
"""

import json
import os
import select
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, LINK_ARGS, AgentError, call, link, progress_line, select as select_links)

POLL_SECONDS = 0.25


class EventStream:
    """`replicator events --follow --since SEQ --json` of the agent: `wait` returns once a
    selected link's state changed (or events were lost), at the deadline, or when the
    stream is gone."""

    def __init__(self, module, since: int, stream: str | None, links: list[dict]):
        self.keys = {(lk["group"], lk["target"]) for lk in links}
        self.proc = subprocess.Popen(
            [module.params["cli"], "events", "--follow", "--since", str(since), "--json",
             *(["--stream", stream] if stream else []), "-c", module.params["config"]],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buffer = b""

    def _relevant(self, line: bytes) -> bool:
        try:
            event = json.loads(line)
        except ValueError:
            return True  # not an event: the status will say what is going on
        return event.get("kind") == "events_lost" or (
            event.get("kind") == "state" and (event.get("group"), event.get("target")) in self.keys)

    def wait(self, deadline: float) -> bool:
        """True: read the status again (a selected link changed, or time is up); False:
        the stream ended (the agent stopped, or has no event stream): poll instead."""
        fd = self.proc.stdout.fileno()
        while True:
            lines = self.buffer.split(b"\n")
            self.buffer = lines.pop()
            if any(self._relevant(line) for line in lines if line.strip()):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return True
            chunk = os.read(fd, 65536)
            if not chunk:
                return False
            self.buffer += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, **LINK_ARGS,
                           state=dict(type="str", default="replicating"),
                           timeout=dict(type="float", default=5),
                           follow_events=dict(type="bool", default=True)),
        supports_check_mode=True,
    )
    p = module.params
    deadline = time.monotonic() + p["timeout"]
    stream, watched = None, "none"
    try:
        while True:
            try:
                status = call(module, "status")
                links = [link(status, g, t) for g, t in select_links(status, p["group"], p["targets"])]
            except AgentError as exc:
                module.fail_json(msg=str(exc))
            lines = [progress_line(lk) for lk in links]
            refused = [lk for lk in links if lk["state"] == "refused" and p["state"] != "refused"]
            if refused:
                module.fail_json(msg="refused by the target: " + "; ".join(
                    progress_line(lk) for lk in refused), links=links, lines=lines)
            done = all(lk["state"] == p["state"] for lk in links)
            if done or time.monotonic() >= deadline:
                module.exit_json(changed=False, done=done, links=links, lines=lines,
                                 watched=watched)
            if watched == "none" and p["follow_events"] and "event_seq" in status:
                # from the seq of the status just read: no change after it is missed
                stream, watched = EventStream(module, status["event_seq"],
                                              status.get("event_stream"), links), "events"
            if stream is not None and not stream.wait(deadline):
                stream.close()
                stream = None  # the stream ended: poll for the rest
            if stream is None:
                watched = "polling"
                time.sleep(POLL_SECONDS)
    finally:
        if stream is not None:
            stream.close()


if __name__ == "__main__":
    main()
