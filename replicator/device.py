"""An NBD export as a local block device, so that a real file system (ext4, xfs, ...)
can live on a replicated volume: `replicator attach-device URI` and `detach-device`.

Two ways, chosen at attach time:

* **kernel nbd** (`nbd-client`), when the kernel has the nbd module (/sys/module/nbd or
  /sys/block/nbd0 exists) and `nbd-client` is on PATH: the export becomes /dev/nbdN.
  The kernel's nbd driver sends a REQ_OP_FLUSH as NBD_CMD_FLUSH and FUA writes as
  NBD_CMD_FLAG_FUA when the server advertises them (ours does). This branch is kept
  minimal and is NOT tested here: the machines the tests run on have no nbd module.
  nbd-client takes no URI, so nbd://HOST[:PORT]/EXPORT and
  nbd+unix:///EXPORT?socket=PATH are translated; nbds:// (TLS) is refused on this
  branch (use the nbdfuse way, which passes the URI through to libnbd).

* **nbdfuse + loop** otherwise (libnbd-bin's `nbdfuse`, /dev/fuse, loop devices):
  `nbdfuse -P PIDFILE MOUNTDIR URI` shows the export as the file MOUNTDIR/nbd (it runs in
  the foreground; we start it in its own session and it is ready once it has written
  PIDFILE), then `losetup --find --show --direct-io=on FILE` makes it /dev/loopN. The URI
  is handed to libnbd unchanged: nbd:// and nbd+unix:///EXPORT?socket=PATH work; a
  URI naming a client certificate (nbds://...?tls-certificates=DIR) is refused, as
  nbdfuse does not allow a URI to name local files (it would fail "local file access
  is not allowed"): attach on the agent's host over its unix socket, the default
  listener, instead of over the network.

How durability survives the stack (what we checked, libnbd 1.14 and Linux 6.x):

* nbdfuse implements FUSE `fsync` as `nbd_aio_flush` (fuse/operations.c, nbdfuse_fsync)
  and waits for its reply -- but only when the server advertises NBD_FLAG_SEND_FLUSH;
  otherwise fsync is silently a no-op. So attach first asks the server (`nbdinfo
  --json`) and refuses a writable attach of an export that cannot flush. nbdfuse has no
  FUSE `flush` (close) nor writeback cache: each FUSE write is an NBD write that has
  completed on the server before the write returns (no data waits in nbdfuse).
* nbdfuse opens several connections when the server advertises multi-conn (ours does:
  a FLUSH covers every write completed before it on any connection of the export), and
  a flush goes down one of them; that is what multi-conn promises, so it is safe here.
* The loop driver turns a REQ_OP_FLUSH into vfs_fsync() of its backing file, which for
  the FUSE file is FUSE_FSYNC, i.e. the NBD FLUSH above. The loop device advertises a
  volatile write cache and no FUA, so the block layer turns a file system's FUA write
  (journal commit) into write + flush. Hence fsync(2) on the file system -> journal
  commit with PREFLUSH/FUA -> loop flush -> FUSE fsync -> NBD FLUSH, which the agent
  completes only once every earlier write is durable locally and on its in-sync sync
  targets (the flush point of the durability contract).
* `--direct-io=on`: the loop device then reads and writes its backing file with
  O_DIRECT, so there is no second page cache between the loop device and nbdfuse
  (nbdfuse's manual warns that loop-mounting its file buffered "may sometimes
  deadlock": writeback of the loop's cache needs memory that nbdfuse may need to serve
  it). FUSE accepts O_DIRECT on this file; the state records whether the kernel really
  uses direct I/O (/sys/block/loopN/loop/dio). Flush semantics hold either way.

State: RUN_DIR/NAME.json (default /run/replicator/devices) holds the URI, the way, the
device, and for nbdfuse the mount directory and nbdfuse's PID, so that detach-device can
undo exactly what attach-device did: `losetup -d`, unmount the FUSE mount (nbdfuse then
exits), wait for that PID to end (signalled by its PID only if it does not), remove the
state. Detach refuses a device that is mounted or held (device busy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse

DEFAULT_RUN_DIR = "/run/replicator/devices"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeviceError(Exception):
    """Why a device could not be attached or detached (the CLI prints it, exit 1)."""


def kernel_nbd_available() -> bool:
    return ((os.path.exists("/sys/module/nbd") or os.path.exists("/sys/block/nbd0"))
            and shutil.which("nbd-client") is not None)


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)  # callers read returncode and stderr
    except FileNotFoundError:
        raise DeviceError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{' '.join(cmd)} did not finish in {timeout}s") from None


def _state_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{name}.json")


def _save(run_dir: str, state: dict) -> None:
    path = _state_path(run_dir, state["name"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_devices(run_dir: str = DEFAULT_RUN_DIR) -> list[dict]:
    """Every attached device this run dir knows, by name."""
    out = []
    try:
        names = sorted(os.listdir(run_dir))
    except FileNotFoundError:
        return out
    for entry in names:
        if entry.endswith(".json"):
            try:
                with open(os.path.join(run_dir, entry)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
    return out


def default_name(uri: str) -> str:
    """The export name of the URI (what the agent calls the volume), made a safe name."""
    path = urllib.parse.urlsplit(uri).path.lstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path) or "nbd"
    return name[:64] if name[0].isalnum() else ("x" + name)[:64]


def probe(uri: str, timeout: float = 30) -> dict | None:
    """What the server says of the export (nbdinfo --json), or None without nbdinfo.
    Raises DeviceError when the export cannot be reached."""
    if shutil.which("nbdinfo") is None:
        return None
    p = _run(["nbdinfo", "--json", uri], timeout)
    if p.returncode != 0:
        why = (p.stderr.strip() or p.stdout.strip() or f"nbdinfo exited {p.returncode}")
        raise DeviceError(f"export {uri} unreachable: {why.splitlines()[-1]}")
    try:
        exports = json.loads(p.stdout)["exports"]
        return exports[0]
    except (ValueError, KeyError, IndexError):
        raise DeviceError(f"export {uri}: nbdinfo said nothing usable: {p.stdout!r}") from None


def attach(uri: str, name: str | None = None, read_only: bool = False,
           run_dir: str = DEFAULT_RUN_DIR, timeout: float = 30.0,
           method: str = "auto") -> dict:
    """Expose the export `uri` as a block device; returns its state (with "device")."""
    name = name or default_name(uri)
    if not NAME_RE.match(name):
        raise DeviceError(f"invalid name {name!r} (letters, digits, . _ -; at most 64)")
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(_state_path(run_dir, name)):
        raise DeviceError(f"a device named {name} is attached already (detach-device {name}, "
                          "or choose another --name)")
    info = probe(uri, timeout)
    if info is not None:
        if info.get("is_read_only") and not read_only:
            read_only = True  # a replica's export: a writable attach could only fail
        if not read_only and not info.get("can_flush"):
            raise DeviceError(f"export {uri} does not advertise FLUSH: fsync on a file system "
                              "on it would promise nothing; attach it --read-only")
    if method == "auto":
        method = "nbd-client" if kernel_nbd_available() else "nbdfuse"
    state = {"name": name, "uri": uri, "method": method, "read_only": read_only,
             "size": info.get("export-size") if info else None, "device": None}
    if method == "nbd-client":
        return _attach_nbd_client(state, run_dir, timeout)
    if method != "nbdfuse":
        raise DeviceError(f"unknown method {method}")
    return _attach_nbdfuse(state, run_dir, timeout)


def _attach_nbdfuse(state: dict, run_dir: str, timeout: float) -> dict:
    if "tls-certificates=" in state["uri"] or "tls-psk-file=" in state["uri"]:
        # nbdfuse (libnbd 1.14) does not let a URI name local files, so it cannot read a
        # client certificate; over TLS it could only fail after starting.
        raise DeviceError("nbdfuse cannot use a client certificate named in the URI (libnbd "
                          "refuses local files in it): attach on the agent's host, over its "
                          "unix socket (nbd+unix:///EXPORT?socket=/run/replicator/nbd.sock)")
    for tool in ("nbdfuse", "losetup"):
        if shutil.which(tool) is None:
            raise DeviceError(f"{tool} is not installed (nbdfuse: package libnbd-bin)")
    if not os.path.exists("/dev/fuse"):
        raise DeviceError("/dev/fuse is missing: no FUSE in this kernel or container")
    name = state["name"]
    mountdir = os.path.join(run_dir, f"{name}.fuse")
    pidfile = os.path.join(run_dir, f"{name}.pid")
    logfile = os.path.join(run_dir, f"{name}.log")
    os.makedirs(mountdir, exist_ok=True)
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    cmd = ["nbdfuse", *(["-r"] if state["read_only"] else []), "-P", pidfile, mountdir,
           state["uri"]]
    with open(logfile, "w") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)  # outlives this command
    state.update(mountdir=mountdir, file=os.path.join(mountdir, "nbd"), pid=proc.pid,
                 log=logfile)
    _save(run_dir, state)  # from here on, detach-device NAME undoes whatever was done
    try:
        deadline = time.monotonic() + timeout
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
            if proc.poll() is not None:
                raise DeviceError(f"nbdfuse exited {proc.returncode} before it was ready: "
                                  + _tail(logfile))
            if time.monotonic() > deadline:
                raise DeviceError(f"nbdfuse not ready after {timeout}s: " + _tail(logfile))
            time.sleep(0.05)
        if not os.path.exists(state["file"]):
            raise DeviceError(f"nbdfuse is ready but {state['file']} is missing")
        cmd = ["losetup", "--find", "--show", "--direct-io=on",
               *(["--read-only"] if state["read_only"] else []), state["file"]]
        p = _run(cmd, timeout)
        if p.returncode != 0:
            raise DeviceError(f"losetup failed: {p.stderr.strip()}")
        device = p.stdout.strip().splitlines()[-1]
        state["device"] = device
        state["direct_io"] = _read(f"/sys/block/{os.path.basename(device)}/loop/dio") == "1"
        _save(run_dir, state)
        return state
    except BaseException:
        try:
            detach(name, run_dir, timeout)
        except DeviceError:
            pass
        raise


def _nbd_client_args(uri: str) -> list[str]:
    u = urllib.parse.urlsplit(uri)
    export = u.path.lstrip("/")
    query = urllib.parse.parse_qs(u.query)
    if u.scheme == "nbd":
        return [u.hostname or "localhost", str(u.port or 10809), "-N", export]
    if u.scheme == "nbd+unix" and "socket" in query:
        return ["-unix", query["socket"][0], "-N", export]
    raise DeviceError(f"{u.scheme}:// is not supported with nbd-client here; the nbdfuse "
                      "way passes any libnbd URI through")


def _attach_nbd_client(state: dict, run_dir: str, timeout: float) -> dict:
    args = _nbd_client_args(state["uri"])
    for dev in sorted((d for d in os.listdir("/sys/block") if re.match(r"^nbd\d+$", d)),
                      key=lambda d: int(d[3:])):
        if os.path.exists(f"/sys/block/{dev}/pid"):
            continue  # connected
        device = f"/dev/{dev}"
        p = _run(["nbd-client", *args, device, *(["-readonly"] if state["read_only"] else [])],
                 timeout)
        if p.returncode != 0:
            raise DeviceError(f"nbd-client failed: {p.stderr.strip() or p.stdout.strip()}")
        state["device"] = device
        _save(run_dir, state)
        return state
    raise DeviceError("no free /dev/nbdN (load nbd with more nbds_max)")


def find(name_or_device: str, run_dir: str = DEFAULT_RUN_DIR) -> dict:
    if name_or_device.startswith("/dev/"):
        want = os.path.realpath(name_or_device)
        for st in list_devices(run_dir):
            if st.get("device") and os.path.realpath(st["device"]) == want:
                return st
    else:
        path = _state_path(run_dir, name_or_device)
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            pass
        except ValueError as exc:
            raise DeviceError(f"{path}: unreadable state: {exc}") from None
    known = ", ".join(f"{st['name']} ({st.get('device')})" for st in list_devices(run_dir))
    raise DeviceError(f"no attached device {name_or_device} in {run_dir}"
                      + (f"; attached: {known}" if known else "; none attached"))


def users(device: str) -> list[str]:
    """What keeps `device` busy: the mount points of file systems on it, and holders
    (device mapper, md)."""
    out = []
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return out
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            major, minor = (int(x) for x in fields[2].split(":"))
            if os.makedev(major, minor) == rdev:
                out.append(fields[4])
    holders = f"/sys/block/{os.path.basename(os.path.realpath(device))}/holders"
    if os.path.isdir(holders):
        out += [f"/dev/{h}" for h in os.listdir(holders)]
    return out


def detach(name_or_device: str, run_dir: str = DEFAULT_RUN_DIR, timeout: float = 30.0) -> dict:
    """Undo attach: each step is skipped when already undone, so a detach that failed
    half-way (or an attach that did) can be run again."""
    state = find(name_or_device, run_dir)
    device = state.get("device")
    if device:
        busy = users(device)
        if busy:
            raise DeviceError(f"{device} ({state['name']}) is busy: used by {', '.join(busy)}; "
                              "unmount it first")
    if state["method"] == "nbd-client":
        if device:
            p = _run(["nbd-client", "-d", device], timeout)
            if p.returncode != 0:
                raise DeviceError(f"nbd-client -d {device} failed: {p.stderr.strip()}")
    else:
        _detach_nbdfuse(state, timeout)
    for suffix in (".json", ".pid", ".log"):
        try:
            os.unlink(os.path.join(run_dir, state["name"] + suffix))
        except FileNotFoundError:
            pass
    return state


def _loop_backing(device: str) -> str | None:
    return _read(f"/sys/block/{os.path.basename(device)}/loop/backing_file")


def _detach_nbdfuse(state: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    device, file = state.get("device"), state.get("file")
    if device and _loop_backing(device) == file:
        p = _run(["losetup", "-d", device], timeout)
        if p.returncode != 0 and _loop_backing(device) == file:
            raise DeviceError(f"losetup -d {device} failed: {p.stderr.strip()}")
        while _loop_backing(device) == file:  # a deferred (autoclear) detach
            if time.monotonic() > deadline:
                raise DeviceError(f"{device} still holds {file} after {timeout}s: still open?")
            time.sleep(0.05)
    mountdir = state.get("mountdir")
    if mountdir and _mounted(mountdir):
        umount = (["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"])
        while True:
            p = _run([*umount, mountdir], timeout)
            if p.returncode == 0 or not _mounted(mountdir):
                break
            if time.monotonic() > deadline:
                raise DeviceError(f"cannot unmount {mountdir}: {p.stderr.strip()}")
            time.sleep(0.1)  # the loop device may let go of the file a moment later
    pid = state.get("pid")
    if pid:
        _end(pid, mountdir, deadline)
    if mountdir:
        try:
            os.rmdir(mountdir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DeviceError(f"cannot remove {mountdir}: {exc}") from None


def _mounted(path: str) -> bool:
    """Something is mounted at `path` (os.path.ismount stats the path: False for a FUSE
    mount whose daemon is gone, ENOTCONN)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def _is_ours(pid: int, mountdir: str | None) -> bool:
    """PID is still the nbdfuse we started (not exited, not a zombie, not reused)."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child (in-process use)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    return os.path.basename(argv[0]) == b"nbdfuse" and (
        mountdir is None or os.fsencode(mountdir) in argv)


def _end(pid: int, mountdir: str | None, deadline: float) -> None:
    """nbdfuse exits by itself once unmounted; signal it (by its PID) only if not."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and _is_ours(pid, mountdir):
            os.kill(pid, sig)
        until = max(deadline, time.monotonic() + 2) if sig is None else time.monotonic() + 5
        while _is_ours(pid, mountdir):
            if time.monotonic() > until:
                break
            time.sleep(0.05)
        else:
            return
    raise DeviceError(f"nbdfuse (pid {pid}) does not exit")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path) as f:
            return " | ".join(line.strip() for line in f.readlines()[-n:]) or "(no output)"
    except OSError:
        return "(no log)"
