"""Real file systems (ext4, xfs) on replicated volumes, through `replicator attach-device`
(nbdfuse + loop here: no kernel nbd module): fsync on the file system is an NBD FLUSH at
the agent; a writer's fsync'd files survive kill -9 of the primary (and of the writer)
on the promoted sync replica, and on the async site after a takeover through the
bunker, with fsck clean; a switchover with the file system unmounted moves it whole.

Every mount, loop device, nbdfuse process and state file a test makes is undone at its
end, whatever happened (the `fs` fixture), and the end checks that nothing is left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from replicator import device, pki
from tests.agents import MiB, free_port, replicator_cli, wait_until

FS_SIZE = {"ext4": 128 * MiB, "xfs": 320 * MiB}  # mkfs.xfs refuses less than 300 MB
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
        "xfs": ["mkfs.xfs", "-q", "-f"]}
FSCK = {"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"]}
TOOLS = ("nbdfuse", "nbdinfo", "losetup", "mkfs.ext4", "mkfs.xfs", "e2fsck", "xfs_repair")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse")
    or any(shutil.which(t) is None for t in TOOLS),
    reason="needs root, /dev/fuse, nbdfuse, losetup, mkfs/fsck of ext4 and xfs")

# The workload: files written and fsync'd (and their directory), recorded in the ledger
# only once fsync returned; every 4th file replaces an earlier one by rename, announced
# ("intent") before and recorded after the directory's fsync. Runs until killed.
WRITER = r"""
import hashlib, json, os, random, sys
root, ledger = sys.argv[1], sys.argv[2]
rnd = random.Random(int(sys.argv[3]))
led = open(ledger, "a")
def log(**entry):
    led.write(json.dumps(entry) + "\n")
    led.flush()
    os.fsync(led.fileno())
def fsync_dir(d):
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
def write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
made, i = [], 0
while True:
    d = os.path.join(root, "d%d" % (i % 8))
    if not os.path.isdir(d):
        os.mkdir(d)
        fsync_dir(root)
    data = rnd.randbytes(rnd.randint(0, 48) * 1024 + rnd.randint(1, 4096))
    digest = hashlib.sha256(data).hexdigest()
    if made and i % 4 == 3:
        path = rnd.choice(made)
        log(path=path, sha256=digest, intent=True)
        tmp = os.path.join(root, path + ".tmp")
        write(tmp, data)
        os.rename(tmp, os.path.join(root, path))
        fsync_dir(os.path.dirname(os.path.join(root, path)))
    else:
        path = os.path.join("d%d" % (i % 8), "f%06d" % i)
        write(os.path.join(root, path), data)
        fsync_dir(d)
        made.append(path)
    log(path=path, sha256=digest)
    i += 1
"""


def _cli(*args: str, timeout: float = 60) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, "-m", "replicator.cli", *args, "--json"],
                       capture_output=True, text=True, timeout=timeout)
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"replicator {' '.join(args)} exited {p.returncode} without "
                             f"JSON:\n{p.stdout}\n{p.stderr}") from None


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class FileSystems:
    """Devices attached with the CLI, file systems mounted on them and writer processes,
    all remembered so that `cleanup` undoes them in the right order."""

    def __init__(self, root):
        self.run_dir = os.path.join(str(root), "devices")
        self.mnt_root = os.path.join(str(root), "mnt")
        self.mounts: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def attach(self, uri: str, name: str, read_only: bool = False) -> str:
        rc, st = _cli("attach-device", uri, "--name", name, "--run-dir", self.run_dir,
                      *(["--read-only"] if read_only else []))
        assert rc == 0, st
        assert st["method"] == "nbdfuse" and st["device"].startswith("/dev/loop"), st
        return st["device"]

    def detach(self, name: str) -> None:
        rc, r = _cli("detach-device", name, "--run-dir", self.run_dir)
        assert rc == 0, r

    def mkfs(self, fstype: str, dev: str) -> None:
        p = _run([*MKFS[fstype], dev])
        assert p.returncode == 0, p.stderr

    def mount(self, dev: str, name: str, *options: str) -> str:
        path = os.path.join(self.mnt_root, name)
        os.makedirs(path, exist_ok=True)
        p = _run(["mount", *(["-o", ",".join(options)] if options else []), dev, path])
        assert p.returncode == 0, p.stderr
        self.mounts.append(path)
        return path

    def umount(self, path: str, lazy_if_needed: bool = False) -> None:
        p = _run(["umount", path], timeout=60)
        if p.returncode != 0 and lazy_if_needed:  # a file system that lost its device
            p = _run(["umount", "-l", path], timeout=60)
        assert p.returncode == 0 and not _mounted(path), p.stderr
        self.mounts.remove(path)

    def fsck(self, fstype: str, dev: str) -> str:
        p = _run([*FSCK[fstype], dev], timeout=300)
        assert p.returncode == 0, f"{FSCK[fstype][0]} found problems:\n{p.stdout}\n{p.stderr}"
        return p.stdout

    def writer(self, root: str, ledger: str, seed: int = 1) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", WRITER, root, ledger, str(seed)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def cleanup(self) -> list[str]:
        """Undo everything; returns what could not be undone (the fixture fails then)."""
        left = []
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
        for path in reversed(self.mounts):
            if _run(["umount", path], timeout=60).returncode != 0:
                _run(["umount", "-l", path], timeout=60)
            if _mounted(path):
                left.append(f"mount {path}")
        for st in device.list_devices(self.run_dir):
            try:
                device.detach(st["name"], self.run_dir, timeout=30)
            except device.DeviceError as exc:
                left.append(f"device {st['name']}: {exc}")
                self._force(st)
        if os.path.isdir(self.run_dir):
            left += [f"file {f}" for f in os.listdir(self.run_dir)]
        return left

    @staticmethod
    def _force(st: dict) -> None:
        """What detach could not do, done without asking: nothing may outlive the test."""
        if st.get("device"):
            _run(["losetup", "-d", st["device"]])
        if st.get("mountdir"):
            _run(["umount", "-l", st["mountdir"]])
        if st.get("pid") and device._is_ours(st["pid"], st.get("mountdir")):
            os.kill(st["pid"], signal.SIGKILL)


@pytest.fixture
def fs(topology, tmp_path):
    """Depends on `topology`, so that it is torn down first: file systems are unmounted
    and devices detached while the agents that survived still serve them."""
    f = FileSystems(tmp_path)
    yield f
    left = f.cleanup()
    assert not left, f"left behind: {left}"


def _ledger(path: str) -> dict[str, tuple[str, set[str]]]:
    """path -> (sha256 it must have, others it may have: a rename announced after it)."""
    want: dict[str, tuple[str | None, set[str]]] = {}
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the writer was killed while it wrote this line
            e = json.loads(line)
            sha, maybe = want.get(e["path"], (None, set()))
            if e.get("intent"):
                maybe = maybe | {e["sha256"]}
            else:
                sha, maybe = e["sha256"], set()
            want[e["path"]] = (sha, maybe)
    return {p: v for p, v in want.items() if v[0] is not None}


def _committed(ledger: str) -> int:
    try:
        with open(ledger) as f:
            return sum(1 for line in f if '"intent"' not in line and line.endswith("\n"))
    except FileNotFoundError:
        return 0


def _check_files(root: str, ledger: str) -> int:
    """Every file the ledger says was fsync'd is there with its content."""
    want = _ledger(ledger)
    bad = []
    for path, (sha, maybe) in want.items():
        try:
            with open(os.path.join(root, path), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            bad.append(f"{path}: {exc}")
            continue
        if got != sha and got not in maybe:
            bad.append(f"{path}: content differs from the fsync'd one")
    assert not bad, f"{len(bad)} of {len(want)} fsync'd files lost or wrong: {bad[:10]}"
    return len(want)


def _role(agent) -> str:
    return agent.group("db")["role"]


def _run_workload_until(fs_, root, ledger, committed, also=lambda: True):
    writer = fs_.writer(root, ledger)
    wait_until(lambda: (writer.poll() is None or _fail(writer))
               and _committed(ledger) >= committed and also(), 120,
               lambda: f"{committed} fsync'd files (have {_committed(ledger)})")
    return writer


def _fail(writer):
    raise AssertionError(f"the writer died: {writer.stderr.read().decode()[-2000:]}")


def _crash(agent, writer) -> None:
    """kill -9 of the primary's agent mid-workload, then of the writer."""
    assert writer.poll() is None, "the writer was not running any more"
    agent.kill()
    writer.kill()
    writer.wait(30)


def _verify_promoted(fs_, agent, fstype, ledger, name) -> int:
    """On the promoted node: mount (replays the file system's journal), every fsync'd
    file there, unmount, fsck clean."""
    dev = fs_.attach(agent.nbd_uri("data"), name)
    root = fs_.mount(dev, name)
    n = _check_files(root, ledger)
    fs_.umount(root)
    fs_.fsck(fstype, dev)
    fs_.detach(name)
    return n


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_fsynced_files_survive_the_loss_of_the_primary_on_the_sync_replica(topology, fs,
                                                                          fstype, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "sync")], volumes={"data": FS_SIZE[fstype]},
                    journal_size="128MiB")
    a, b = topo["a"], topo["b"]
    dev = fs.attach(a.nbd_uri("data"), "a")
    fs.mkfs(fstype, dev)
    root = fs.mount(dev, "a")
    ledger = str(tmp_path / "ledger.jsonl")
    writer = _run_workload_until(fs, root, ledger, 150)
    _crash(a, writer)
    fs.umount(root, lazy_if_needed=True)  # its device is gone: I/O errors
    fs.detach("a")

    wait_until(lambda: b.group("db")["upstream"] is None, 20, "b to lose its source")
    rc, r = replicator_cli(b, "promote", "db")
    assert rc == 0, r
    assert _role(b) == "primary"
    assert _verify_promoted(fs, b, fstype, ledger, "b") >= 100


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_fsynced_files_survive_a_takeover_through_the_bunker(topology, fs, fstype, tmp_path):
    """a ships sync to the bunker k and async to the far c; c is lost mid-workload and
    falls behind, then the primary's site is lost: c promoted replays from k what it
    lacks, and holds every fsync'd file."""
    topo = topology(["a", "k", "c"], [("a", "k", "sync", {"bunker": True}),
                                      ("a", "c", "async")],
                    volumes={"data": FS_SIZE[fstype]}, bunkers=["k"],
                    node_options={"c": {"bunker": "k"}}, journal_size="128MiB")
    a, c = topo["a"], topo["c"]
    dev = fs.attach(a.nbd_uri("data"), "a")
    fs.mkfs(fstype, dev)
    root = fs.mount(dev, "a")
    ledger = str(tmp_path / "ledger.jsonl")
    writer = _run_workload_until(fs, root, ledger, 60)
    c.kill()  # the far site goes away; the workload goes on
    seen = _committed(ledger)
    wait_until(lambda: (writer.poll() is None or _fail(writer))
               and _committed(ledger) >= seen + 100, 120, "100 more fsync'd files")
    _crash(a, writer)
    fs.umount(root, lazy_if_needed=True)
    fs.detach("a")

    c.start()
    wait_until(lambda: c.group("db")["upstream"] is None, 20, "c to have no source")
    rc, r = replicator_cli(c, "promote", "db")
    assert rc == 0, r
    assert r["bunker_replay"]["replayed"] > 0 and r["rpo_records"] == 0, r
    assert _role(c) == "primary"
    assert _verify_promoted(fs, c, fstype, ledger, "c") >= 100


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_switchover_moves_an_unmounted_file_system_whole(topology, fs, fstype, tmp_path):
    """Unmount on a (its device stays attached through the switchover), switchover to
    b, mount on b: every file is there, the file system clean, and writable on b."""
    topo = topology(["a", "b"], [("a", "b", "sync")], volumes={"data": FS_SIZE[fstype]},
                    journal_size="128MiB")
    a, b = topo["a"], topo["b"]
    dev_a = fs.attach(a.nbd_uri("data"), "a")
    fs.mkfs(fstype, dev_a)
    root = fs.mount(dev_a, "a")
    ledger = str(tmp_path / "ledger.jsonl")
    writer = _run_workload_until(fs, root, ledger, 80)
    writer.terminate()
    writer.wait(30)
    fs.umount(root)
    topo.wait_converged()

    rc, r = replicator_cli(a, "switchover", "db", "--to", "b")
    assert rc == 0, r
    assert _role(b) == "primary" and _role(a) == "secondary"
    fs.detach("a")
    dev_b = fs.attach(b.nbd_uri("data"), "b")
    fs.fsck(fstype, dev_b)  # unmounted cleanly on a: nothing to replay, clean as it is
    root = fs.mount(dev_b, "b")
    assert _check_files(root, ledger) >= 60
    with open(os.path.join(root, "after-switchover"), "wb") as f:
        f.write(b"written on b\n")
        os.fsync(f.fileno())
    fs.umount(root)
    fs.fsck(fstype, dev_b)
    fs.detach("b")
    topo.wait_converged()
    # a, a replica now, holds b's file system too; its export is read-only
    dev_a = fs.attach(a.nbd_uri("data"), "a-replica", read_only=True)
    root = fs.mount(dev_a, "a-replica", "ro", *(("norecovery",) if fstype == "xfs" else ()))
    with open(os.path.join(root, "after-switchover"), "rb") as f:
        assert f.read() == b"written on b\n"
    fs.umount(root)
    fs.detach("a-replica")


def test_fsync_on_the_file_system_is_a_flush_at_the_agent(topology, fs):
    """nbdfuse maps FUSE fsync to NBD FLUSH and the loop device its flushes to fsync of
    the file: an fsync that returned left nothing unflushed at the agent."""
    topo = topology(["a", "b"], [("a", "b", "sync")], volumes={"data": FS_SIZE["ext4"]})
    a = topo["a"]
    dev = fs.attach(a.nbd_uri("data"), "a")
    fs.mkfs("ext4", dev)
    root = fs.mount(dev, "a")
    os.sync()

    def quiet():  # nothing written since the last flush (no lazy init: see MKFS)
        g = a.group("db")
        return g["flush_seq"] == g["seq"]
    wait_until(quiet, 30, "the file system to settle")
    for i in range(5):
        before = a.group("db")
        with open(os.path.join(root, f"f{i}"), "wb") as f:
            f.write(os.urandom(256 * 1024))
            mid = a.group("db")
            os.fsync(f.fileno())
        after = a.group("db")
        assert mid["seq"] == before["seq"], "written back before fsync: nothing to show"
        assert after["seq"] > before["seq"] and after["flush_seq"] == after["seq"], \
            (before, after)
    fs.umount(root)
    fs.detach("a")


def test_attach_and_detach_say_what_is_wrong(topology, fs):
    topo = topology(["a"], [], volumes={"data": 16 * MiB})
    run = ["--run-dir", fs.run_dir]
    rc, err = _cli("attach-device", "nbd://127.0.0.1:9/data", *run)
    assert rc == 1 and "unreachable" in err["error"], err
    rc, err = _cli("attach-device", topo["a"].nbd_uri("nosuch"), *run)
    assert rc == 1 and "unreachable" in err["error"], err
    assert device.list_devices(fs.run_dir) == []
    rc, err = _cli("detach-device", "data", *run)
    assert rc == 1 and "no attached device data" in err["error"], err

    dev = fs.attach(topo["a"].nbd_uri("data"), "data")
    rc, err = _cli("attach-device", topo["a"].nbd_uri("data"), *run)  # default name: data
    assert rc == 1 and "attached already" in err["error"], err
    fs.mkfs("ext4", dev)
    root = fs.mount(dev, "data")
    rc, err = _cli("detach-device", dev, *run)
    assert rc == 1 and "busy" in err["error"] and root in err["error"], err
    fs.umount(root)
    rc, r = _cli("detach-device", dev, *run)  # by device
    assert rc == 0 and r["name"] == "data", r
    assert device.list_devices(fs.run_dir) == [] and os.listdir(fs.run_dir) == []


def test_a_file_system_over_nbd_with_tls_is_refused_with_the_way_that_works(topology, fs,
                                                                           tmp_path):
    """nbdfuse will not read a client certificate named in a URI; attach says so, and
    what to do instead, before starting anything."""
    topo = topology(["a"], [], volumes={"data": 16 * MiB}, tls=True, start=False)
    a = topo["a"]
    port = free_port()
    certs = str(tmp_path / "app")
    pki.issue_client(os.path.join(topo.root, "ca"), "app", certs)
    a.config.update(nbd_tls_listen=f"127.0.0.1:{port}", nbd_clients={"app": {"exports": ["data"]}})
    a.save_config()
    topo.start()
    rc, st = _cli("attach-device", f"nbds://127.0.0.1:{port}/data?tls-certificates={certs}",
                  "--name", "tls", "--run-dir", fs.run_dir)
    assert rc == 1 and "unix socket" in st["error"] and "nbd+unix://" in st["error"], st
    assert device.list_devices(fs.run_dir) == []
