"""Test harness: real agent processes on loopback, built from a small topology
description, with status polling under a deadline and cleanup that always runs."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import yaml

from replicator import admin, pki

MiB = 1 << 20


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this process handed out before
    (the kernel may offer the same free port twice before anyone binds it: two agents
    of one topology then collided)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_until(predicate, timeout: float = 30.0, what="condition", interval: float = 0.05):
    """Poll `predicate` until it returns a truthy value; fail with `what` (a text, or a
    function giving one: the state at the deadline) at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - agent may be starting; keep polling
            last_exc = exc
        time.sleep(interval)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


class AgentProc:
    def __init__(self, root, node: str, config: dict):
        self.node = node
        self.dir = os.path.join(str(root), node)
        os.makedirs(self.dir, exist_ok=True)
        self.config = config
        self.config_path = os.path.join(self.dir, "agent.yml")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.save_config()
        self.proc: subprocess.Popen | None = None
        self.nofile: int | None = None  # RLIMIT_NOFILE (soft and hard) to start it with
        self.prefix: list[str] = []  # a wrapper to start it under (ip netns exec NS)

    def save_config(self) -> None:
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config, f)

    @property
    def nbd_port(self) -> int:
        return int(self.config["nbd_listen"].rsplit(":", 1)[1])

    def nbd_uri(self, volume: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{volume}"

    def volume_path(self, group: str, volume: str) -> str:
        g = next(g for g in self.config["groups"] if g["name"] == group)
        return next(v["path"] for v in g["volumes"] if v["name"] == volume)

    def start(self, wait: bool = True) -> "AgentProc":
        log = open(self.log_path, "a")
        nofile = self.nofile

        def limits():
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "replicator.cli",
                                      "agent", "-c", self.config_path], stdout=log, stderr=log,
                                     preexec_fn=limits if nofile is not None else None)
        log.close()
        if wait:
            wait_until(lambda: self.status(), 20, f"agent {self.node} to answer status")
        return self

    def status(self) -> dict:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent {self.node} exited with {self.proc.returncode}:\n"
                                 + self.log_tail())
        return admin.request(self.config["admin_socket"], "status", timeout=5)

    def group(self, name: str) -> dict:
        return next(g for g in self.status()["groups"] if g["name"] == name)

    def target(self, group: str, node: str) -> dict:
        return next(t for t in self.group(group)["targets"] if t["node"] == node)

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def _target(link: tuple) -> dict:
    t = {"node": link[1], "mode": link[2]}
    for extra in link[3:]:
        t.update(extra if isinstance(extra, dict) else {"compress": extra})
    return t


def replicator_cli(agent: "AgentProc", *args: str, timeout: float = 120) -> tuple[int, dict]:
    """Run `replicator ARGS -c <agent's config> --json`: (exit code, decoded JSON)."""
    p = subprocess.run([sys.executable, "-m", "replicator.cli", *args, "-c", agent.config_path,
                        "--json"], capture_output=True, text=True, timeout=timeout)
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"replicator {' '.join(args)} exited {p.returncode} without JSON:"
                             f"\n{p.stdout}\n{p.stderr}") from None


def events(agent: "AgentProc", *args: str, timeout: float = 30) -> list[dict]:
    """`replicator events --json ARGS` of the agent: every event it kept, decoded."""
    p = subprocess.run([sys.executable, "-m", "replicator.cli", "events", "--json", "-c",
                        agent.config_path, *args], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


def kinds(agent: "AgentProc", kind: str) -> list[dict]:
    """The agent's events of one kind."""
    return [e for e in events(agent) if e["kind"] == kind]


class Topology:
    """Nodes on loopback; `links` are (from, to, mode[, compress][, {target keys}]) edges
    of one group whose primary is the first node that is never a `to`."""

    def __init__(self, root, nodes, links, volumes=None, group="db", journal_size="64MiB",
                 heartbeat_timeout=3.0, tls=False, group_options=None, bunkers=(),
                 node_options=None):
        self.root = str(root)
        ca_dir = os.path.join(self.root, "ca")
        if tls:
            pki.init_ca(ca_dir)
        volumes = volumes or {"data": 16 * MiB, "log": 4 * MiB}
        ports = {n: (free_port(), free_port()) for n in nodes}
        sources = {link[1]: link[0] for link in links}
        self.agents: dict[str, AgentProc] = {}
        for n in nodes:
            targets = [_target(link) for link in links if link[0] == n]
            if tls:
                pki.issue(ca_dir, n, os.path.join(self.root, n, "pki"), addresses=("127.0.0.1",))
            cfg = {
                "node": n,
                "tls": {"ca": os.path.join(ca_dir, "ca.crt"),
                        "cert": os.path.join(self.root, n, "pki", f"{n}.crt"),
                        "key": os.path.join(self.root, n, "pki", f"{n}.key")} if tls else False,
                "listen": f"127.0.0.1:{ports[n][0]}",
                "nbd_listen": f"127.0.0.1:{ports[n][1]}",
                "state_dir": os.path.join(self.root, n, "state"),
                "admin_socket": os.path.join(self.root, n, "admin.sock"),
                "peers": {p: f"127.0.0.1:{ports[p][0]}" for p in nodes if p != n},
                "heartbeat_interval": 0.5,
                "heartbeat_timeout": heartbeat_timeout,
                "groups": [{
                    "name": group,
                    "role": ("bunker" if n in bunkers else
                             "secondary" if n in sources else "primary"),
                    "source": sources.get(n),
                    "journal_size": journal_size,
                    "volumes": [] if n in bunkers else [
                        {"name": v, "path": os.path.join(self.root, n, "vol", f"{v}.img"),
                         "size": size} for v, size in volumes.items()],
                    "targets": targets,
                    # a bunker serves the takeover replay (FETCH) of the far replicas
                    **({"members": [p for p in nodes if p not in (n, sources.get(n))]}
                       if n in bunkers else {}),
                    **(group_options or {}),
                    **((node_options or {}).get(n, {})),
                }],
            }
            self.agents[n] = AgentProc(self.root, n, cfg)
        self.group = group
        self.volumes = list(volumes)
        self.primary = next(n for n in nodes if n not in sources)
        self.bunkers = set(bunkers)

    def __getitem__(self, node: str) -> AgentProc:
        return self.agents[node]

    def start(self) -> "Topology":
        for a in self.agents.values():
            a.start(wait=False)
        for a in self.agents.values():
            wait_until(a.status, 20, f"agent {a.node} to answer status")
        return self

    def stop(self) -> None:
        for a in self.agents.values():
            a.kill()

    def wait_converged(self, timeout: float = 60.0, group: str | None = None) -> int:
        """Every node has applied everything the primary journaled, and every link is
        back to replicating (no initial sync or resync still running), in `group`
        (default: the topology's group; an agent's config may hold more)."""
        group = group or self.group

        def converged():
            seq = self[self.primary].group(group)["seq"]
            groups = {n: a.group(group) for n, a in self.agents.items()}
            applied = {g["applied_seq"] for n, g in groups.items() if n not in self.bunkers}
            links = all(t["state"] == "replicating" for g in groups.values() for t in g["targets"])
            return applied == {seq} and links and (seq,)  # a tuple: truthy even at seq 0
        (seq,) = wait_until(converged, timeout, "replicas to apply every record")
        return seq

    def assert_identical(self, nodes=None) -> None:
        nodes = nodes or list(self.agents)
        for vol in self.volumes:
            ref = self[self.primary].volume_path(self.group, vol)
            for n in nodes:
                if n == self.primary or n in self.bunkers:
                    continue
                other = self[n].volume_path(self.group, vol)
                assert filecmp.cmp(ref, other, shallow=False), \
                    f"volume {vol} differs between {self.primary} and {n}"

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{a.log_tail()}" for n, a in self.agents.items())


@contextlib.contextmanager
def small_fs(path, size: str):
    """A tmpfs of `size` (e.g. "2m") mounted at `path`: a file system that fills up for
    real. Unmounted on exit, whatever happened (lazily: a killed agent may still hold
    a file open for a moment)."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def loop_fs(path, fstype: str, size: str = "300M"):
    """A real file system of `fstype` ("xfs": with reflink=1, "ext4", "btrfs") in a loop
    image beside `path`, mounted at `path`. Unmounted on exit, whatever happened (lazily:
    a killed process may hold a file for a moment; the loop device goes with the last
    user), and its image removed."""
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "ext4": ["mkfs.ext4", "-q", "-F"],
            "btrfs": ["mkfs.btrfs", "-q"]}[fstype]
    image = f"{path}.{fstype}.img"
    os.makedirs(path, exist_ok=True)
    subprocess.run(["truncate", "-s", size, image], check=True)
    try:
        subprocess.run([*mkfs, image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, str(path)], check=True)
        try:
            yield str(path)
        finally:
            subprocess.run(["umount", "-l", str(path)], check=True)
    finally:
        os.unlink(image)


def resize_fs(path, size: str) -> None:
    """Grow or shrink a small_fs (tmpfs refuses to shrink below what it holds)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill_up(directory) -> str:
    """Take every free byte of `directory`'s file system; returns the filler's path."""
    path = os.path.join(str(directory), "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for n in (65536, 4096, 1):  # down to the last partial page
            try:
                while os.write(fd, b"f" * n):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return path
