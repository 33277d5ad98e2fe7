"""A shaped link for tests: a network namespace (rg-...) joined to the root namespace
by a veth pair with addresses in 10.231.0.0/24, and kernel queueing disciplines on the
veth ends (never on the host's own interfaces). An agent started inside the namespace
(AgentProc.prefix = link.prefix) is reached only across the pair, so only what crosses
it is shaped: a tbf at `rate` on the root end shapes what the root namespace sends
in; `drop_all` drops every packet both ways.

This kernel has no netem (CONFIG_NET_SCH_NETEM is off), so dropping everything is a tbf
whose bucket (burst) is smaller than any packet: tbf drops a packet larger than its
bucket, and every IPv4 TCP segment (a bare ACK is 66 bytes on the wire) is.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

NO_PACKET_FITS = ["tbf", "rate", "1kbit", "burst", "60", "limit", "1"]


def _run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")


class ShapedLink:
    """Namespace `ns` with address `ns_ip`, reached from `host_ip` over veth ends
    `host_dev` (root namespace) and `ns_dev` (inside), one /30 of 10.231.0.0/24."""

    def __init__(self, index: int):
        tag = f"{os.getpid() % 10000}-{index}"
        self.ns, self.host_dev, self.ns_dev = f"rg-{tag}", f"rg-h{tag}", f"rg-n{tag}"
        base = 4 * index
        self.host_ip, self.ns_ip = f"10.231.0.{base + 1}", f"10.231.0.{base + 2}"
        self.prefix = ["ip", "netns", "exec", self.ns]
        self.rate: str | None = None

    def create(self) -> "ShapedLink":
        _run("ip", "netns", "add", self.ns)
        try:
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            _run("ip", "link", "set", self.ns_dev, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            _run(*self.prefix, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
            _run(*self.prefix, "ip", "link", "set", self.ns_dev, "up")
            _run(*self.prefix, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def shape(self, rate: str) -> None:
        """What the root namespace sends in goes at `rate` (tc's units: "16mbit");
        the way back is not shaped."""
        self.rate = rate
        _run("tc", "qdisc", "replace", "dev", self.host_dev, "root", "tbf", "rate", rate,
             "burst", "32kb", "latency", "100ms")
        with contextlib.suppress(AssertionError):  # none there: nothing to take away
            _run(*self.prefix, "tc", "qdisc", "del", "dev", self.ns_dev, "root")

    def drop_all(self) -> None:
        """Every packet, both ways, is dropped from now on."""
        _run("tc", "qdisc", "replace", "dev", self.host_dev, "root", *NO_PACKET_FITS)
        _run(*self.prefix, "tc", "qdisc", "replace", "dev", self.ns_dev, "root",
             *NO_PACKET_FITS)

    def restore(self) -> None:
        """Back to the shaping before drop_all (or none)."""
        if self.rate is not None:
            self.shape(self.rate)
        else:
            for cmd in (("tc", "qdisc", "del", "dev", self.host_dev, "root"),
                        (*self.prefix, "tc", "qdisc", "del", "dev", self.ns_dev, "root")):
                with contextlib.suppress(AssertionError):
                    _run(*cmd)

    def delete(self) -> None:
        """The pair goes with its root end; the namespace after it (whatever is left)."""
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def place(topo, node: str, link: ShapedLink) -> None:
    """Run `node` of a Topology (not started yet) inside the link's namespace: it
    listens on the namespace's address, and every other node reaches it there."""
    agent = topo[node]
    port = agent.config["listen"].rsplit(":", 1)[1]
    agent.config["listen"] = f"{link.ns_ip}:{port}"
    agent.prefix = link.prefix
    agent.save_config()
    for other in topo.agents.values():
        if other is not agent:
            other.config["peers"][node] = f"{link.ns_ip}:{port}"
            other.save_config()
