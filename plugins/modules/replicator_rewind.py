#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A writable copy of a replica's volumes at a point of its window (replicator rewind)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_rewind
short_description: A copy of a replica's volumes at a point before a logical corruption
description:
  - On a secondary whose group keeps a window (C(retain) or C(apply_delay) on its incoming link),
    runs C(replicator rewind GROUP --to POINT --copy DIR). The agent copies the volumes (a reflink
    where the file system can) and takes the copy forward through the journal or back through
    the history to the point, while the replica goes on replicating. The replica itself is not
    changed; to take over at a point, see replicator_promote's I(at).
  - A copy already in I(copy) of the same group at the point asked for is left alone (not changed);
    a copy at another point is refused (remove it first with I(state=absent)).
  - C(state=absent) deletes the copy (its images and C(snapshot.json)), nothing else in I(copy).
  - In check mode nothing is copied or deleted.
version_added: 0.1.0
author: [The replicator team (@voltrail)]
extends_documentation_fragment: [voltrail.replicator.replicator_agent]
options:
  group:
    description: The group.
    type: str
    required: true
  to:
    description:
      - "The point - a seq, a time (ISO 8601 like C(2026-12-02T05:10:00Z), or C(-15m)), a marker name;
        C(seq:), C(time:) or C(marker:) in front when a name could be either."
      - Required with C(state=present).
    type: str
  copy:
    description: Directory of the copy (new or empty), on the replica's host.
    type: path
    required: true
  state:
    description: C(present) makes the copy, C(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
"""

EXAMPLES = r"""
- name: A copy of dc4-vault's volumes at the marker taken before the upgrade
  voltrail.replicator.replicator_rewind:
    group: db
    to: before-upgrade
    copy: /var/lib/replicator/rewind/db
  register: rewound  # rewound.snapshot.volumes.data.path: the copy of volume data

- name: A copy as of 15 minutes ago
  voltrail.replicator.replicator_rewind:
    group: db
    to: -15m
    copy: /var/lib/replicator/rewind/db-15m

- name: Done with it
  voltrail.replicator.replicator_rewind:
    group: db
    copy: /var/lib/replicator/rewind/db
    state: absent
"""

RETURN = r"""
snapshot:
  description: The copy's manifest (C(snapshot.json)) - group, seq, time, marker, rewound_from
    and C(volumes) (name -> path, size); before the deletion with C(state=absent).
  type: dict
  returned: when a copy exists or was made
seconds:
  description: How long the agent took to make the copy.
  type: float
  returned: when a copy was made
result:
  description: The agent's answer (C(replicator rewind --json)) - group, copy (the manifest), seconds.
  type: dict
  returned: when a copy was made
"""

import contextlib
import json
import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import (
    AGENT_ARGS, AgentError, call)


def existing(directory: str) -> dict | None:
    """The manifest of the copy in `directory`, or None when there is none."""
    try:
        with open(os.path.join(directory, "snapshot.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise AgentError(f"{directory}/snapshot.json is not a copy's manifest: {exc}") from None


def at_point(manifest: dict, point: str) -> bool:
    """Is the copy at the point as asked for (the same words)?"""
    kind, sep, value = point.partition(":") if point.split(":", 1)[0] in ("seq", "time", "marker") \
        else ("", "", point)
    if kind in ("", "marker") and manifest.get("marker") == value:
        return True
    if kind in ("", "seq") and value.isdigit():
        return manifest.get("seq") == int(value)
    return False


def remove(manifest: dict, directory: str) -> None:
    for vol in manifest.get("volumes", {}).values():
        if os.path.dirname(os.path.abspath(vol["path"])) == os.path.abspath(directory):
            with contextlib.suppress(FileNotFoundError):  # an image already gone
                os.unlink(vol["path"])
    os.unlink(os.path.join(directory, "snapshot.json"))
    if not os.listdir(directory):
        os.rmdir(directory)


def main():
    module = AnsibleModule(
        argument_spec=dict(**AGENT_ARGS, group=dict(type="str", required=True), to=dict(type="str"),
                           copy=dict(type="path", required=True),
                           state=dict(type="str", choices=["present", "absent"], default="present")),
        required_if=[("state", "present", ["to"])],
        supports_check_mode=True)
    p = module.params
    try:
        manifest = existing(p["copy"])
        if manifest is not None and manifest.get("group") != p["group"]:
            raise AgentError(f"{p['copy']} holds a copy of group {manifest.get('group')!r}, not {p['group']!r}")
        if p["state"] == "absent":
            if manifest is not None and not module.check_mode:
                remove(manifest, p["copy"])
            module.exit_json(changed=manifest is not None, diff=dict(
                before={"copy": p["copy"], "seq": manifest["seq"]} if manifest else {}, after={}),
                **({"snapshot": manifest} if manifest else {}))
        if manifest is not None:
            if not at_point(manifest, p["to"]):
                raise AgentError(f"{p['copy']} holds a copy at seq {manifest.get('seq')} (marker "
                                 f"{manifest.get('marker')}, {manifest.get('time')}), not at {p['to']}: "
                                 "remove it first (state=absent)")
            module.exit_json(changed=False, snapshot=manifest)
        if module.check_mode:
            module.exit_json(changed=True, diff=dict(before={}, after={"copy": p["copy"], "to": p["to"]}))
        answer = call(module, "rewind", p["group"], "--to", p["to"], "--copy", p["copy"])
    except AgentError as exc:
        module.fail_json(msg=str(exc))
    snapshot = answer["copy"]
    module.exit_json(changed=True, snapshot=snapshot, seconds=answer.get("seconds"), result=answer,
                     diff=dict(before={}, after={"copy": p["copy"], "seq": snapshot["seq"],
                                                 "marker": snapshot["marker"]}))


if __name__ == "__main__":
    main()
