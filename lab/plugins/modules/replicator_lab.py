#!/usr/bin/python
"""Build or remove the replicator lab on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_lab
short_description: Lab hosts on one Linux machine (namespaces, sshd, shaped site uplinks)
description:
  - Builds one lab host per inventory host, each with its own network namespace holding
    its address, its own sshd (key-only root login), hostname, private mounts and PID
    namespace; sites are joined by uplinks shaped with tc tbf. Runs on the controller
    as root. See lab/plugins/module_utils/replicator_lab.py for how it works.
options:
  state:
    description: C(up) builds what is missing, C(down) removes everything, C(status) reports.
    type: str
    choices: [up, down, status]
    default: up
  dir:
    description: Lab directory on the controller (keys, host files, private mounts, state).
    type: path
    required: true
  prefix:
    description: Prefix of the lab's interface and namespace names.
    type: str
    default: rlab
  network:
    description: The lab network (CIDR); every host's address must be in it.
    type: str
    required: true
  controller_address:
    description: Address of the controller on the lab network (default the first one).
    type: str
  hosts:
    description: Lab hosts, each C({name, address, site, filesystems}); C(filesystems) is
      a list of C({mountpoint, type, size}) (mountpoint C(/srv/NAME), type xfs (with
      reflink), btrfs or ext4) made once as image files and loop-mounted inside the host
      only (every lab host's /srv is its own).
    type: list
    elements: dict
    default: []
  sites:
    description: "Per site, C({uplink: RATE}) (for example C(100mbit)); sites not named are unshaped."
    type: dict
    default: {}
  init_script:
    description: Path of lab/scripts/lab_init.py (copied into the lab directory). Required for C(up).
    type: path
  boot:
    description: Command a lab host runs at boot if its program exists (the agent's supervisor).
    type: list
    elements: str
    default: []
  prometheus:
    description:
      - With C(state=up), also run Prometheus (the Debian package's C(prometheus)) on the
        controller, scraping every host of I(prometheus_targets) every 2 s (job C(replicator),
        label C(node)) and evaluating I(prometheus_rules); its configuration, data, log and
        PID file are in DIR/prometheus. Idempotent; a new configuration is reloaded.
      - C(state=down) always stops it (by its PID file, checked to be our prometheus) and
        removes its data.
    type: bool
    default: false
  prometheus_listen:
    description: HOST:PORT Prometheus answers on (default the controller's lab address, port 9090).
    type: str
  prometheus_targets:
    description: Per lab host, the HOST:PORT of its agent's metrics endpoint. Required with I(prometheus).
    type: dict
    default: {}
  prometheus_rules:
    description: Rule files Prometheus evaluates (the repository's monitoring/alerts.yml).
    type: list
    elements: path
    default: []
"""

RETURN = r"""
hosts:
  description: Per host, its address, site, namespace, whether it runs and is connected.
  type: dict
  returned: always
prometheus:
  description: The lab's Prometheus, C({running, pid, url, config}).
  type: dict
  returned: always
summary:
  description: One line per host (and one for Prometheus when it runs), for people.
  type: list
  elements: str
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.voltrail.replicator_lab.plugins.module_utils.replicator_lab import (
    Lab, LabError)
from ansible_collections.voltrail.replicator_lab.plugins.module_utils.replicator_lab_prometheus import (
    LabPrometheus)


def summary(hosts: dict, prometheus: dict) -> list[str]:
    lines = [f"{name:<12} {h['address']:<15} site {h['site']:<6} "
             f"{'running' if h['running'] else 'stopped'}, "
             f"{'connected' if h['connected'] else 'isolated'}, netns {h['netns']}"
             for name, h in hosts.items()]
    if prometheus["running"]:
        lines.append(f"{'prometheus':<12} {prometheus['url']} (pid {prometheus['pid']}), "
                     f"config {prometheus['config']}")
    return lines


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["up", "down", "status"], default="up"),
            dir=dict(type="path", required=True),
            prefix=dict(type="str", default="rlab"),
            network=dict(type="str", required=True),
            controller_address=dict(type="str"),
            hosts=dict(type="list", elements="dict", default=[]),
            sites=dict(type="dict", default={}),
            init_script=dict(type="path"),
            boot=dict(type="list", elements="str", default=[]),
            prometheus=dict(type="bool", default=False),
            prometheus_listen=dict(type="str"),
            prometheus_targets=dict(type="dict", default={}),
            prometheus_rules=dict(type="list", elements="path", default=[]),
        ),
        required_if=[("state", "up", ["init_script"])],
        supports_check_mode=True,
    )
    p = module.params
    try:
        lab = Lab(p["dir"], p["prefix"], p["network"], p["hosts"], p["sites"],
                  controller_address=p["controller_address"], init_script=p["init_script"],
                  boot=p["boot"])
        prometheus = LabPrometheus(p["dir"])
        listen = p["prometheus_listen"] or f"{lab.controller}:9090"
        before = lab.status()
        if module.check_mode or p["state"] == "status":
            running = all(h["running"] for h in before.values())
            prom = prometheus.status(listen)
            changed = {"up": not running or (p["prometheus"] and not prom["running"]),
                       "down": any(h["running"] for h in before.values()) or prom["running"],
                       "status": False}[p["state"]]
            module.exit_json(changed=changed and module.check_mode, hosts=before,
                             prometheus=prom, summary=summary(before, prom))
        if p["state"] == "up":
            changed = lab.up()
            if p["prometheus"]:
                changed |= prometheus.up(listen, p["prometheus_targets"], p["prometheus_rules"])
        else:
            changed = prometheus.down()  # before lab.down removes its PID file
            changed |= lab.down()
        after, prom = lab.status(), prometheus.status(listen)
        module.exit_json(changed=changed, hosts=after, prometheus=prom, summary=summary(after, prom))
    except LabError as exc:
        module.fail_json(msg=f"lab: {exc}")


if __name__ == "__main__":
    main()
