"""The lab's network: bridges, veth pairs, namespaces and shaped site uplinks.

One bridge `<prefix>wan` in the root namespace carries the controller's address (the
WAN). Each site has a bridge `<prefix>s<j>` joined to the WAN by a veth pair
`<prefix>u<j>` (site side) / `<prefix>w<j>` (WAN side); a tc tbf qdisc on each end
limits the site's uplink in both directions. Each host has a network namespace
`<prefix>-<host>` whose `eth0` is a veth peer of `<prefix>h<i>` on its site's bridge.
No default route anywhere: only the lab network and loopback are reachable. Isolating a
host sets `<prefix>h<i>` down from the root namespace, where the host cannot undo it.
Every name starts with the prefix, so a teardown finds everything without a state file.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess

RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


class LabError(Exception):
    """The lab cannot be built, changed or removed; the message says what and where."""


def run(*cmd: str, check: bool = True, netns: str | None = None) -> str:
    if netns:
        cmd = ("ip", "netns", "exec", netns) + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def rate_bits(rate: str) -> int:
    m = RATE_RE.match(str(rate))
    if not m:
        raise LabError(f"uplink {rate!r}: expected a rate like 100mbit, 1gbit or 512kbit")
    return int(float(m.group(1)) * _RATE_UNITS[(m.group(2) or "").lower()])


def links() -> dict[str, dict]:
    return {link["ifname"]: link for link in json.loads(run("ip", "-j", "link", "show") or "[]")}


class LabNetwork:
    """`hosts`: [{name, address, site}] sorted by name; `uplinks`: {site: bits/s or None}."""

    def __init__(self, prefix: str, network, controller: str, hosts: list[dict], uplinks: dict):
        self.prefix, self.network, self.controller = prefix, network, controller
        self.hosts, self.uplinks = hosts, uplinks
        self.sites = sorted(uplinks)

    # names ------------------------------------------------------------------
    @property
    def wan(self) -> str:
        return f"{self.prefix}wan"

    def netns(self, host: dict) -> str:
        return f"{self.prefix}-{host['name']}"

    def host_if(self, host: dict) -> str:
        return f"{self.prefix}h{self.hosts.index(host)}"

    def site_ifs(self, site: str) -> tuple[str, str, str]:
        j = self.sites.index(site)
        return f"{self.prefix}s{j}", f"{self.prefix}u{j}", f"{self.prefix}w{j}"

    # building -----------------------------------------------------------------
    def _check_free(self) -> None:
        for entry in json.loads(run("ip", "-j", "addr", "show") or "[]"):
            if entry["ifname"].startswith(self.prefix):
                continue
            for a in entry.get("addr_info", []):
                if a.get("family") == "inet" and ipaddress.ip_network(
                        f"{a['local']}/{a['prefixlen']}", strict=False).overlaps(self.network):
                    raise LabError(f"the lab network {self.network} overlaps {a['local']}/"
                                   f"{a['prefixlen']} on {entry['ifname']}; choose another "
                                   "replicator_lab_network")

    @staticmethod
    def _bridge(name: str, existing: dict) -> bool:
        if name in existing:
            return False
        run("ip", "link", "add", name, "type", "bridge", "stp_state", "0", "nf_call_iptables", "0",
            "nf_call_ip6tables", "0", "nf_call_arptables", "0")
        run("ip", "link", "set", name, "up")
        return True

    @staticmethod
    def _shape(ifname: str, bits: int | None) -> bool:
        """tbf on the egress of `ifname`; True if the qdisc changed."""
        current = json.loads(run("tc", "-j", "qdisc", "show", "dev", ifname) or "[]")
        root = next((q for q in current if q.get("root")), {})
        if bits is None:
            if root.get("kind") != "tbf":
                return False
            run("tc", "qdisc", "del", "dev", ifname, "root")
            return True
        if root.get("kind") == "tbf" and root.get("options", {}).get("rate") == bits // 8:
            return False
        burst = max(32 * 1024, bits // 8 // 100)  # 10 ms worth, at least 32 KiB
        run("tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{bits}bit",
            "burst", str(burst), "latency", "100ms")
        return True

    def up(self) -> bool:
        """Make what is missing; True if anything changed."""
        existing = links()
        changed = False
        if self.wan not in existing:
            self._check_free()
            self._bridge(self.wan, existing)
            run("ip", "addr", "add", f"{self.controller}/{self.network.prefixlen}", "dev", self.wan)
            changed = True
        for site in self.sites:
            bridge, up, wan = self.site_ifs(site)
            changed |= self._bridge(bridge, existing)
            if up not in existing:
                run("ip", "link", "add", up, "type", "veth", "peer", "name", wan)
                run("ip", "link", "set", up, "master", bridge, "up")
                run("ip", "link", "set", wan, "master", self.wan, "up")
                changed = True
            changed |= self._shape(up, self.uplinks[site])
            changed |= self._shape(wan, self.uplinks[site])
        namespaces = set(run("ip", "netns", "list").split())
        for h in self.hosts:
            ns, hif = self.netns(h), self.host_if(h)
            if ns not in namespaces:
                run("ip", "netns", "add", ns)
                run("ip", "link", "set", "lo", "up", netns=ns)
                run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1", netns=ns)
                changed = True
            if hif not in existing:
                run("ip", "link", "add", hif, "type", "veth", "peer", "name", hif + "p")
                run("ip", "link", "set", hif + "p", "netns", ns)
                run("ip", "link", "set", hif + "p", "name", "eth0", netns=ns)
                run("ip", "addr", "add", f"{h['address']}/{self.network.prefixlen}", "dev", "eth0",
                    netns=ns)
                run("ip", "link", "set", "eth0", "up", netns=ns)
                run("ip", "link", "set", hif, "master", self.site_ifs(h["site"])[0], "up")
                changed = True
        return changed

    def namespaces(self) -> list[str]:
        return [ns for ns in run("ip", "netns", "list").split() if ns.startswith(self.prefix + "-")]

    def down(self) -> bool:
        """Remove every namespace and link named with the prefix; True if any existed."""
        changed = False
        for ns in self.namespaces():
            run("ip", "netns", "del", ns, check=False)
            changed = True
        ours = re.compile(rf"^{self.prefix}(h\d+|s\d+|u\d+|w\d+|wan)$")
        for name in sorted(links(), key=lambda n: n.endswith("wan")):
            if ours.match(name):
                run("ip", "link", "del", name, check=False)  # a veth's peer goes with it
                changed = True
        return changed

    def set_link(self, host: dict, up: bool) -> bool:
        """Connect (up) or isolate (down) a host; True if it changed."""
        hif = self.host_if(host)
        link = links().get(hif)
        if link is None:
            raise LabError(f"host {host['name']}: its link {hif} does not exist; is the lab up?")
        if ("UP" in link["flags"]) == up:
            return False
        run("ip", "link", "set", hif, "up" if up else "down")
        return True

    def connected(self, host: dict, existing: dict) -> bool:
        link = existing.get(self.host_if(host))
        return bool(link and "UP" in link["flags"])
