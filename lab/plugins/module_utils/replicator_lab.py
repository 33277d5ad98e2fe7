"""The lab: several hosts on one Linux machine, reached over real SSH.

Theory of operation
-------------------
Network: see replicator_lab_net (a namespace per host with its address, site bridges,
uplinks shaped with tc tbf, isolation by taking a host's link down).

Processes. Each host is a process tree rooted at lab/scripts/lab_init.py, PID 1 of the
host's own PID, mount and UTS namespaces (see that script). We record the launcher's
and the init's host PIDs (read from the root namespace, with their start times so a
reused PID is never taken for ours) and the PID namespace inode. A crash is SIGKILL of
the init; stopping is SIGTERM then SIGKILL; in both cases we wait until no process of
that PID namespace is left.

State. `<dir>/lab.json` records what `up` made; `down` removes it and everything named
with the lab's prefix, so a lost state file still tears down cleanly.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

from ansible_collections.voltrail.replicator_lab.plugins.module_utils.replicator_lab_net import (
    LabError, LabNetwork, links, rate_bits, run)

# /srv too: volumes an inventory places there (the same path on every host, as a real
# site's layout would be) must be each host's own, not one file of the machine's.
PRIVATE_DIRS = ("/etc/replicator", "/var/lib/replicator", "/run/replicator",
                "/opt/replicator", "/var/log/replicator", "/srv")
MOUNTPOINTS = PRIVATE_DIRS + ("/run/sshd",)
STATE_FILE = "lab.json"
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
SSH_WAIT_SECONDS = 20
STOP_WAIT_SECONDS = 20
# A lab host's own file systems: an image file each, made once, loop-mounted by the
# host's init in its private mount namespace (gone with the namespace, back at boot).
MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"],
        "ext4": ["mkfs.ext4", "-q", "-F"]}
MOUNTPOINT_RE = re.compile(r"^/srv/[A-Za-z0-9._-]+$")  # /srv is the host's own


# ---------------------------------------------------------------- processes

def start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live process, None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(proc: dict | None) -> bool:
    """`proc` ({pid, start}) is the very process we recorded and it is still running."""
    return bool(proc) and start_time(proc["pid"]) == proc["start"]


def pidns_members(inode: int) -> list[int]:
    """Host PIDs of the live processes in the PID namespace with this inode."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino == inode and start_time(int(entry)):
                pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(0.05)


class Lab:
    """One lab, described by the inventory (see the lab module's documentation)."""

    def __init__(self, lab_dir: str, prefix: str, network: str, hosts: list[dict],
                 sites: dict, controller_address: str | None = None,
                 init_script: str | None = None, boot: list[str] | None = None):
        if not re.match(r"^[a-z][a-z0-9]{0,7}$", prefix):
            raise LabError(f"prefix {prefix!r}: 1-8 lowercase letters/digits (interface "
                           "names are limited to 15 characters)")
        self.dir = os.path.abspath(lab_dir)
        self.prefix = prefix
        try:
            self.network = ipaddress.ip_network(network)
        except ValueError as exc:
            raise LabError(f"network {network!r}: {exc}") from None
        self.controller = controller_address or str(next(self.network.hosts()))
        self.init_script = init_script
        self.boot = boot or []
        self.site_args = {s: dict(v or {}) for s, v in sites.items()}
        self.sites = sorted({h["site"] for h in hosts})
        self.uplinks = {s: rate_bits((sites.get(s) or {})["uplink"])
                        if (sites.get(s) or {}).get("uplink") else None for s in self.sites}
        self.hosts = sorted(({"name": h["name"], "address": str(h["address"]),
                              "site": str(h["site"]),
                              "filesystems": list(h.get("filesystems") or [])} for h in hosts),
                            key=lambda h: h["name"])
        self._check_hosts()
        self.net = LabNetwork(prefix, self.network, self.controller, self.hosts, self.uplinks)

    def _check_hosts(self) -> None:
        seen = {self.controller: "the controller"}
        if ipaddress.ip_address(self.controller) not in self.network:
            raise LabError(f"controller address {self.controller} is not in {self.network}")
        for h in self.hosts:
            if not HOSTNAME_RE.match(h["name"]):
                raise LabError(f"host {h['name']!r}: lab host names are lowercase letters, "
                               "digits and '-' (they become hostnames and namespace names)")
            addr = h["address"]
            try:
                if ipaddress.ip_address(addr) not in self.network:
                    raise LabError(f"host {h['name']}: ansible_host {addr} is not in the lab "
                                   f"network {self.network}; pick an address from it")
            except ValueError:
                raise LabError(f"host {h['name']}: ansible_host {addr!r} is not an IP address; "
                               "lab hosts need one from the lab network") from None
            if addr in seen:
                raise LabError(f"host {h['name']}: address {addr} is already used by {seen[addr]}")
            seen[addr] = h["name"]
            for fs in h["filesystems"]:
                if not isinstance(fs, dict) or set(fs) != {"mountpoint", "type", "size"} or \
                        fs["type"] not in MKFS or not MOUNTPOINT_RE.match(str(fs["mountpoint"])):
                    raise LabError(f"host {h['name']}: file system {fs!r}: expected {{mountpoint: "
                                   "/srv/NAME, type: one of "
                                   f"{', '.join(MKFS)}, size: like 512M}}")

    def host_dir(self, host: dict) -> str:
        return os.path.join(self.dir, "hosts", host["name"])

    def host(self, name: str) -> dict:
        for h in self.hosts:
            if h["name"] == name:
                return h
        raise LabError(f"{name!r} is not a lab host (hosts: {', '.join(h['name'] for h in self.hosts)})")

    # state ------------------------------------------------------------------
    def load_state(self) -> dict:
        try:
            with open(os.path.join(self.dir, STATE_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def save_state(self, state: dict) -> None:
        path = os.path.join(self.dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=2)
        os.replace(path + ".tmp", path)

    def spec(self) -> dict:
        """What the lab was built from: `from_state` rebuilds the Lab from it."""
        return {"prefix": self.prefix, "network": str(self.network),
                "controller_address": self.controller, "hosts": self.hosts,
                "sites": self.site_args, "boot": self.boot}

    @classmethod
    def from_state(cls, lab_dir: str) -> "Lab":
        try:
            with open(os.path.join(lab_dir, STATE_FILE)) as f:
                spec = json.load(f)["spec"]
        except (FileNotFoundError, KeyError):
            raise LabError(f"no lab in {lab_dir}: run lab/playbooks/lab.yml -e lab_state=up") from None
        return cls(lab_dir, init_script=os.path.join(lab_dir, "lab_init.py"), **spec)

    # hosts ------------------------------------------------------------------
    def _files(self, host: dict, pubkey: str) -> str:
        hd = self.host_dir(host)
        ssh = os.path.join(hd, "ssh")
        os.makedirs(ssh, mode=0o700, exist_ok=True)
        for d in PRIVATE_DIRS:
            os.makedirs(hd + "/root" + d, mode=0o755, exist_ok=True)
        key = os.path.join(ssh, "ssh_host_ed25519_key")
        if not os.path.exists(key):
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host["name"], "-f", key)
        with open(os.path.join(ssh, "authorized_keys"), "w") as f:
            f.write(pubkey)
        os.chmod(os.path.join(ssh, "authorized_keys"), 0o600)
        with open(os.path.join(ssh, "sshd_config"), "w") as f:
            f.write("\n".join([
                f"ListenAddress {host['address']}:22",
                f"HostKey {key}",
                "PidFile none",
                f"AuthorizedKeysFile {ssh}/authorized_keys",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "X11Forwarding no",
                "AllowTcpForwarding no",
                "PrintMotd no",
                "MaxStartups 100",
                "Subsystem sftp internal-sftp",
                "",
            ]))
        filesystems = []
        for fs in host["filesystems"]:
            image = os.path.join(hd, "fs", os.path.basename(fs["mountpoint"]) + ".img")
            if not os.path.exists(image):
                os.makedirs(os.path.dirname(image), exist_ok=True)
                run("truncate", "-s", str(fs["size"]), image + ".new")
                run(*MKFS[fs["type"]], image + ".new")
                os.replace(image + ".new", image)
            filesystems.append([image, fs["mountpoint"], fs["type"]])
        spec = {
            "name": host["name"],
            "binds": [[hd + "/root" + d, d] for d in PRIVATE_DIRS],
            "filesystems": filesystems,
            "sshd": ["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(ssh, "sshd_config")],
            "boot": self.boot,
        }
        path = os.path.join(hd, "host.json")
        with open(path, "w") as f:
            json.dump(spec, f, indent=2)
        return path

    def _launch(self, host: dict, spec_path: str) -> dict:
        log = open(os.path.join(self.host_dir(host), "init.log"), "ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.net.netns(host), "unshare", "--uts", "--mount", "--pid",
                 "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
                 "/usr/bin/python3", "-I", os.path.join(self.dir, "lab_init.py"), spec_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                close_fds=True)
        finally:
            log.close()
        launcher = {"pid": proc.pid, "start": wait_for(lambda: start_time(proc.pid), 5,
                                                       f"host {host['name']}'s launcher")}

        def init_pid():
            if proc.poll() is not None:
                raise LabError(f"host {host['name']}: launcher exited with {proc.returncode}; "
                               f"see {self.host_dir(host)}/init.log")
            try:
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    children = f.read().split()
            except FileNotFoundError:
                return None
            # the launcher is `ip netns exec` until it has exec'd unshare, which forks init
            with open(f"/proc/{proc.pid}/comm") as f:
                is_unshare = f.read().strip() == "unshare"
            return int(children[0]) if children and is_unshare else None

        pid = wait_for(init_pid, 10, f"host {host['name']}'s init")
        init = {"pid": pid, "start": wait_for(lambda: start_time(pid), 5, "init start time"),
                "pidns": os.stat(f"/proc/{pid}/ns/pid").st_ino}
        return {"launcher": launcher, "init": init}

    def _wait_sshd(self, host: dict) -> None:
        def banner():
            try:
                with socket.create_connection((host["address"], 22), timeout=1) as s:
                    return s.recv(64).startswith(b"SSH-")
            except OSError:
                return False
        wait_for(banner, SSH_WAIT_SECONDS, f"sshd of {host['name']} on {host['address']}:22 "
                                           f"(see {self.host_dir(host)}/init.log)")

    def boot_host(self, name: str, state: dict) -> bool:
        """Start a host's process tree unless it runs; True if it was started."""
        host = self.host(name)
        procs = state.setdefault("procs", {}).get(name)
        if procs and alive(procs["init"]):
            return False
        with open(os.path.join(self.dir, "ssh", "id_ed25519.pub")) as f:
            pubkey = f.read()
        state["procs"][name] = self._launch(host, self._files(host, pubkey))
        self.save_state(state)
        self._wait_sshd(host)
        return True

    def stop_host(self, name: str, state: dict, sig: int = signal.SIGTERM) -> bool:
        """Stop (SIGTERM, then SIGKILL) or crash (SIGKILL) a host; True if it ran."""
        procs = state.get("procs", {}).get(name)
        if not procs or not alive(procs["init"]):
            return False
        init = procs["init"]
        os.kill(init["pid"], sig)
        try:
            wait_for(lambda: not pidns_members(init["pidns"]), STOP_WAIT_SECONDS,
                     f"the processes of host {name} to exit")
        except LabError:
            if alive(init):
                os.kill(init["pid"], signal.SIGKILL)
            wait_for(lambda: not pidns_members(init["pidns"]), 10,
                     f"the processes of host {name} to die after SIGKILL")
        if alive(procs["launcher"]):  # --kill-child: it exits with its child
            wait_for(lambda: not alive(procs["launcher"]), 5, f"host {name}'s launcher to exit")
        return True

    # the whole lab ----------------------------------------------------------
    def up(self) -> bool:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, bridges, mounts): "
                           "run ansible-playbook with sudo")
        for tool in ("ip", "tc", "unshare", "mount", "ssh-keygen", "/usr/sbin/sshd"):
            if not shutil.which(tool):
                raise LabError(f"{tool} not found: run scripts/setup.sh (iproute2, util-linux, "
                               "openssh-server)")
        state = self.load_state()
        if state and state.get("spec") != self.spec():
            raise LabError(f"a lab built from another inventory exists in {self.dir}; run "
                           "lab/playbooks/lab.yml -e lab_state=down with that inventory first")
        changed = not state
        os.makedirs(os.path.join(self.dir, "ssh"), mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "cp"), mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)  # sshd's StrictModes checks the authorized_keys path
        state.setdefault("spec", self.spec())
        created = state.setdefault("created_dirs", [])
        for d in MOUNTPOINTS:
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o755)
                created.append(d)
        self.save_state(state)
        key = os.path.join(self.dir, "ssh", "id_ed25519")
        if not os.path.exists(key):
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "replicator-lab", "-f", key)
        shutil.copyfile(self.init_script, os.path.join(self.dir, "lab_init.py"))
        changed |= self.net.up()
        for h in self.hosts:
            changed |= self.boot_host(h["name"], state)
        return changed

    def down(self) -> bool:
        if os.geteuid() != 0:
            raise LabError("the lab needs root: run ansible-playbook with sudo")
        state = self.load_state()
        changed = False
        for name in state.get("procs", {}):
            changed |= self.stop_host(name, state)
        changed |= self._kill_netns_stragglers()
        if self._close_ssh_masters():
            changed = True
        changed |= self.net.down()
        for d in reversed(state.get("created_dirs", [])):
            try:
                os.rmdir(d)  # only if empty: never remove what someone else put there
                changed = True
            except (FileNotFoundError, OSError):
                pass
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
            changed = True
        return changed

    def _close_ssh_masters(self) -> bool:
        """ControlPersist masters outlive a teardown and would hang the next run."""
        cp = os.path.join(self.dir, "cp")
        if not os.path.isdir(cp):
            return False
        sockets = os.listdir(cp)
        for sock in sockets:
            subprocess.run(["ssh", "-o", f"ControlPath={os.path.join(cp, sock)}", "-O", "exit",
                            "lab"], capture_output=True, timeout=10)
        return bool(sockets)

    def _kill_netns_stragglers(self) -> bool:
        """Kill what still runs in a lab network namespace (e.g. after a lost state
        file): every such process was started by the lab or in it."""
        inodes = {os.stat(f"/run/netns/{ns}").st_ino for ns in self.net.namespaces()}
        victims = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    victims.append({"pid": int(entry), "start": start_time(int(entry))})
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        for v in victims:
            if alive(v):
                os.kill(v["pid"], signal.SIGKILL)
        wait_for(lambda: not any(alive(v) for v in victims), 10, "stray lab processes to die")
        return bool(victims)

    def status(self) -> dict:
        """Per host: running, connected."""
        state, existing = self.load_state(), links()
        out = {}
        for h in self.hosts:
            procs = state.get("procs", {}).get(h["name"])
            out[h["name"]] = {
                "address": h["address"], "site": h["site"], "netns": self.net.netns(h),
                "running": bool(procs and alive(procs["init"])),
                "init_pid": procs["init"]["pid"] if procs else None,
                "connected": self.net.connected(h, existing),
            }
        return out
