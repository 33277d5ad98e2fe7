"""Drive the lab from pytest: playbooks as subprocesses from the repository root, the
lab's hosts and volumes as the inventory declares them, convergence polled through the
agents' admin sockets (reachable from the root namespace through the lab directory)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import yaml

from replicator import admin
from tests.agents import wait_until
from tests.ansible.ansible_harness import ROOT

BIN = os.path.dirname(sys.executable)
INVENTORY = os.path.join(ROOT, "inventories", "lab")


def playbook(name: str, *args: str, check: bool = True, timeout: float = 900) -> str:
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    p = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", INVENTORY,
                        os.path.join(ROOT, "playbooks", name), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"ansible-playbook {name} {' '.join(args)} exited {p.returncode}:\n"
                             f"{p.stdout[-6000:]}\n{p.stderr[-3000:]}")
    return p.stdout


class Lab:
    """The lab inventory, read the way the playbooks read it."""

    def __init__(self):
        with open(os.path.join(INVENTORY, "hosts.yml")) as f:
            hosts = yaml.safe_load(f)["all"]["children"]["replicator"]["hosts"]
        with open(os.path.join(INVENTORY, "group_vars", "replicator", "lab.yml")) as f:
            self.dir = yaml.safe_load(f)["replicator_lab_dir"]
        with open(os.path.join(INVENTORY, "group_vars", "replicator", "topology.yml")) as f:
            (self.group,) = yaml.safe_load(f)["replicator_groups"]
        self.address = {name: h["ansible_host"] for name, h in hosts.items()}
        self.nodes = list(hosts)
        self.primary = self.group["primary"]
        self.volumes = [v["name"] for v in self.group["volumes"]]
        # journal-only members: no volumes to compare
        self.bunkers = {link["to"] for link in self.group["links"] if link.get("bunker")}

    def host_path(self, node: str, path: str) -> str:
        """A path of a lab host's private directories, as seen from the root namespace."""
        return os.path.join(self.dir, "hosts", node, "root", path.lstrip("/"))

    def volume(self, node: str, volume: str) -> str:
        return self.host_path(node, f"/var/lib/replicator/volumes/{self.group['name']}/{volume}.img")

    def nbd_uri(self, volume: str, node: str | None = None) -> str:
        return f"nbd://{self.address[node or self.primary]}:10809/{volume}"

    def status(self, node: str) -> dict:
        return admin.request(self.host_path(node, "/run/replicator/admin.sock"), "status", timeout=5)

    def group_status(self, node: str) -> dict:
        return next(g for g in self.status(node)["groups"] if g["name"] == self.group["name"])

    def state(self) -> dict:
        with open(os.path.join(self.dir, "lab.json")) as f:
            return json.load(f)

    def wait_converged(self, timeout: float = 120) -> int:
        """Every node applied everything the primary journaled, and every link replicates."""
        def converged():
            seq = self.group_status(self.primary)["seq"]
            groups = [self.group_status(n) for n in self.nodes]
            ok = ({g["applied_seq"] for g in groups} == {seq}
                  and all(t["state"] == "replicating" for g in groups for t in g["targets"]))
            return ok and (seq,)
        (seq,) = wait_until(converged, timeout, "every replica to apply every record", interval=0.2)
        return seq

    def assert_identical(self) -> None:
        for vol in self.volumes:
            ref = self.volume(self.primary, vol)
            for node in self.nodes:
                if node != self.primary and node not in self.bunkers:
                    assert filecmp.cmp(ref, self.volume(node, vol), shallow=False), \
                        f"volume {vol} of {node} differs from {self.primary}'s"

    def leftovers(self) -> list[str]:
        """What a lab teardown must have removed, if anything is still there."""
        found = []
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith("rlab-")]
        links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                          text=True).stdout)
        found += [f"link {link['ifname']}" for link in links if link["ifname"].startswith("rlab")]
        if os.path.exists(self.dir):
            found.append(f"directory {self.dir}")
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {line.split()[4]}" for line in f if self.dir in line]
        return found
