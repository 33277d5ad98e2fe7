#!/usr/bin/python
"""Fault actions on one lab host: isolate, heal, crash, boot."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_lab_fault
short_description: Isolate, heal, crash or boot a lab host
description:
  - C(isolate) takes the host's link down (from the root namespace, so the host cannot undo it);
    C(heal) brings it up again. C(crash) kills every process of the host at once (SIGKILL of
    its PID namespace's init, by the host PID recorded at launch); C(boot) starts it again with
    its disks (private directories) as they were. Runs on the controller as root.
options:
  dir:
    description: The lab directory (as given to replicator_lab).
    type: path
    required: true
  host:
    description: Name of the lab host.
    type: str
    required: true
  action:
    description: What to do.
    type: str
    choices: [isolate, heal, crash, boot]
    required: true
"""

import signal

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator_lab.plugins.module_utils.replicator_lab import (
    Lab, LabError)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dir=dict(type="path", required=True),
            host=dict(type="str", required=True),
            action=dict(type="str", choices=["isolate", "heal", "crash", "boot"], required=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        lab = Lab.from_state(p["dir"])
        host = lab.host(p["host"])
        state = lab.load_state()
        before = lab.status()[p["host"]]
        would = {"isolate": before["connected"], "heal": not before["connected"],
                 "crash": before["running"], "boot": not before["running"]}[p["action"]]
        if module.check_mode or not would:
            module.exit_json(changed=would, host=before)
        if p["action"] in ("isolate", "heal"):
            lab.net.set_link(host, up=p["action"] == "heal")
        elif p["action"] == "crash":
            lab.stop_host(p["host"], state, sig=signal.SIGKILL)
        else:
            lab.boot_host(p["host"], state)
        module.exit_json(changed=True, host=lab.status()[p["host"]])
    except LabError as exc:
        module.fail_json(msg=f"lab: {exc}")


if __name__ == "__main__":
    main()
