"""Drive the lab from pytest: playbooks as subprocesses from the repository root, the
lab's hosts and volumes as the inventory declares them, convergence polled through the
agents' admin sockets (reachable from the root namespace through the lab directory)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
import yaml

from replicator import admin
from tests.agents import wait_until
from tests.ansible.ansible_harness import ROOT

BIN = os.path.dirname(sys.executable)
# the extra vars of a DR exercise that fails the primary over and back (not the default)
DESTRUCTIVE = ("-e", "dr_exercise_mode=destructive", "-e", "replicator_safe_mode=false")
NBD_TLS_PORT = 10809  # replicator_agent_nbd_port: the hosts' NBD TLS listener
LAB_PLAYBOOKS = {"lab.yml": ("lab", "playbooks"), "lab_fault.yml": ("lab", "playbooks")}


def lab_marks(timeout: float) -> list:
    """pytest marks of a module that drives a lab: it needs root and sshd."""
    return [
        pytest.mark.integration,
        pytest.mark.timeout(timeout),
        pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (namespaces, bridges, "
                           "mounts)"),
        pytest.mark.skipif(not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"),
                           reason="the lab needs openssh-server (scripts/setup.sh installs it)"),
    ]


def inventory_dir(name: str) -> str:
    return os.path.join(ROOT, "inventories", name)


def playbook(name: str, *args: str, check: bool = True, timeout: float = 900,
             inventory: str = "lab") -> str:
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    cmd = [os.path.join(BIN, "ansible-playbook"), "-i", inventory_dir(inventory),
           os.path.join(ROOT, *LAB_PLAYBOOKS.get(name, ("playbooks",)), name), *args]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # where it hung: the tail of what it printed
        raise AssertionError(f"ansible-playbook {name} {' '.join(args)} still ran after {timeout}s:\n"
                             f"{(e.stdout or b'').decode(errors='replace')[-6000:]}\n"
                             f"{(e.stderr or b'').decode(errors='replace')[-3000:]}") from None
    if check and p.returncode != 0:
        raise AssertionError(f"ansible-playbook {name} {' '.join(args)} exited {p.returncode}:\n"
                             f"{p.stdout[-6000:]}\n{p.stderr[-3000:]}")
    return p.stdout


class Lab:
    """A lab inventory (inventories/NAME), read the way the playbooks read it. Methods
    that take `group` default to the inventory's first group."""

    def __init__(self, inventory: str = "lab"):
        self.inventory = inventory
        vars_dir = os.path.join(inventory_dir(inventory), "group_vars", "replicator")
        with open(os.path.join(inventory_dir(inventory), "hosts.yml")) as f:
            hosts = yaml.safe_load(f)["all"]["children"]["replicator"]["hosts"]
        with open(os.path.join(vars_dir, "lab.yml")) as f:
            lab_vars = yaml.safe_load(f)
        self.dir = lab_vars["replicator_lab_dir"]
        self.prefix = lab_vars.get("replicator_lab_prefix", "rlab")  # its namespaces' names
        # where -e lab_prometheus=true runs Prometheus
        self.prometheus_url = f"http://{lab_vars.get('replicator_lab_prometheus_listen')}"
        with open(os.path.join(vars_dir, "topology.yml")) as f:
            self.groups = {g["name"]: g for g in yaml.safe_load(f)["replicator_groups"]}
        self.group = next(iter(self.groups.values()))
        self.address = {name: h["ansible_host"] for name, h in hosts.items()}
        self.nodes = list(hosts)
        self.primary = self.group["primary"]
        self.volumes = [v["name"] for v in self.group["volumes"]]
        # journal-only members: no volumes to compare
        self.bunkers = {link["to"] for link in self.group["links"] if link.get("bunker")}

    def playbook(self, name: str, *args: str, **kwargs) -> str:
        return playbook(name, *args, inventory=self.inventory, **kwargs)

    def members(self, group: str | None = None) -> list[str]:
        g = self.groups[group] if group else self.group
        return [n for n in self.nodes
                if n == g["primary"] or any(n in (l["from"], l["to"]) for l in g["links"])]

    def netns(self, node: str) -> str:
        """The network namespace of a lab host (`ip netns exec NAME ...`)."""
        return f"{self.prefix}-{node}"

    def host_path(self, node: str, path: str) -> str:
        """A path of a lab host's private directories, as seen from the root namespace."""
        return os.path.join(self.dir, "hosts", node, "root", path.lstrip("/"))

    def volume(self, node: str, volume: str, group: str | None = None) -> str:
        name = group or self.group["name"]
        return self.host_path(node, f"/var/lib/replicator/volumes/{name}/{volume}.img")

    def nbd_socket(self, node: str | None = None) -> str:
        """The host's NBD unix socket (plain, 0660 root), reachable from the root namespace
        through the lab directory (/run/replicator is a private directory of the host)."""
        path = self.host_path(node or self.primary, "/run/replicator/nbd.sock")
        assert len(path.encode()) < 108, f"{path}: too long for a unix socket address"
        return path

    def nbd_uri(self, volume: str, node: str | None = None) -> str:
        """The NBD URI of a host's export: its unix socket (on the network NBD is TLS only)."""
        return f"nbd+unix:///{volume}?socket={self.nbd_socket(node)}"

    @property
    def drill_certs(self) -> str:
        """The NBD client certificate the replicator_pki role issues the DR exercise."""
        return os.path.join(self.dir, "pki", "clients", "replicator-drill")

    def nbds_uri(self, volume: str, node: str | None = None) -> str:
        """NBD over TLS to the host's address, with the DR exercise's client certificate."""
        return (f"nbds://{self.address[node or self.primary]}:{NBD_TLS_PORT}/{volume}"
                f"?tls-certificates={self.drill_certs}")

    def status(self, node: str) -> dict:
        return admin.request(self.host_path(node, "/run/replicator/admin.sock"), "status", timeout=5)

    def prometheus(self, path: str) -> dict:
        """GET the lab Prometheus's API PATH (like `query?query=up`); its `data`."""
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/{path}", timeout=5) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]

    def links(self) -> list[tuple[str, str, str]]:
        """Every link of the topology as (group, source, target)."""
        return [(g["name"], lk["from"], lk["to"]) for g in self.groups.values() for lk in g["links"]]

    def group_status(self, node: str, group: str | None = None) -> dict:
        name = group or self.group["name"]
        return next(g for g in self.status(node)["groups"] if g["name"] == name)

    def state(self) -> dict:
        with open(os.path.join(self.dir, "lab.json")) as f:
            return json.load(f)

    def wait_converged(self, timeout: float = 120, group: str | None = None) -> int:
        """Every member applied everything the primary journaled, and every link
        replicates."""
        g = self.groups[group] if group else self.group

        def converged():
            seq = self.group_status(g["primary"], g["name"])["seq"]
            states = [self.group_status(n, g["name"]) for n in self.members(g["name"])]
            ok = ({s["applied_seq"] for s in states} == {seq}
                  and all(t["state"] == "replicating" for s in states for t in s["targets"]))
            return ok and (seq,)
        (seq,) = wait_until(converged, timeout, f"every replica of {g['name']} to apply every "
                            "record", interval=0.2)
        return seq

    def assert_identical(self, group: str | None = None) -> None:
        g = self.groups[group] if group else self.group
        bunkers = {link["to"] for link in g["links"] if link.get("bunker")}
        for vol in (v["name"] for v in g["volumes"]):
            ref = self.volume(g["primary"], vol, g["name"])
            for node in self.members(g["name"]):
                if node != g["primary"] and node not in bunkers:
                    assert filecmp.cmp(ref, self.volume(node, vol, g["name"]), shallow=False), \
                        f"volume {vol} of group {g['name']} on {node} differs from {g['primary']}'s"

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
