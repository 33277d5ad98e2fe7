"""PID 1 of one lab host.

The lab module starts this script as
    ip netns exec NETNS unshare --uts --mount --pid --fork --kill-child --mount-proc \
        --propagation private python3 lab_init.py HOST.json
so it runs in the host's own network, UTS, mount and PID namespaces. It makes the
host look like a machine of its own: hostname, private directories bind-mounted from
the lab directory, a private /tmp, no view of the machine's systemd. Then it runs the
host's sshd (restarted if it dies), runs the boot command if one is installed (the
agent's supervisor: an "enabled" service), reaps every orphan, and on SIGTERM stops
every process of the host before exiting. SIGKILL of this process is a crash: the
kernel kills every process of the PID namespace with it.

HOST.json: {"name", "binds": [[src, dst], ...], "filesystems": [[image, mountpoint,
            type], ...], "sshd": [argv...], "boot": [argv...], "log": path}. Standard
library only: it runs before anything is installed. A file system is loop-mounted (under
the host's private /srv) in the host's mount namespace only: it goes away with the host
(a crash included) and comes back when the host boots again.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

STOP_GRACE_SECONDS = 10


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} lab-init: {msg}", file=sys.stderr, flush=True)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def setup(spec: dict) -> None:
    socket.sethostname(spec["name"])
    for src, dst in spec["binds"]:
        mount("--bind", src, dst)
    mount("-t", "tmpfs", "-o", "mode=1777,size=256m", "tmpfs", "/tmp")
    for image, mountpoint, fstype in spec.get("filesystems", []):
        os.makedirs(mountpoint, exist_ok=True)
        mount("-t", fstype, "-o", "loop", image, mountpoint)
    if os.path.isdir("/run/systemd"):
        # the machine's systemd must stay out of reach: systemctl here would start
        # services in the root namespaces
        mount("-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs", "/run/systemd")


def stop_everything(signum, frame) -> None:
    log(f"signal {signum}: stopping every process of the host")
    try:
        os.kill(-1, signal.SIGTERM)  # PID 1 of a PID namespace: everyone but itself
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            log("all processes stopped")
            sys.exit(0)
        if pid == 0:
            time.sleep(0.05)
    log("grace period over; exiting (the kernel kills the rest)")
    sys.exit(1)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    signal.signal(signal.SIGTERM, stop_everything)
    signal.signal(signal.SIGINT, stop_everything)
    setup(spec)
    sshd = subprocess.Popen(spec["sshd"], stdin=subprocess.DEVNULL)
    log(f"host {spec['name']} up, sshd pid {sshd.pid}")
    boot = spec.get("boot") or []
    if boot and os.access(boot[0], os.X_OK):
        log(f"boot: {' '.join(boot)}")
        subprocess.Popen(boot, stdin=subprocess.DEVNULL)
    while True:
        pid, status = os.wait()  # reaps orphans too: we are PID 1 of the namespace
        if pid == sshd.pid:
            log(f"sshd exited ({status}); restarting in 1s")
            time.sleep(1)
            sshd = subprocess.Popen(spec["sshd"], stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
