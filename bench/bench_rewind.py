"""Point in time (issue 19): a rewind copy of a 1 GiB volume to a marker 100 MiB of
writes back, against copying those changed bytes once; and the bytes a secondary's
window retains per byte written inside it.

    .venv/bin/python -m bench.bench_rewind [--runs 3] [--fs xfs,ext4] [--workloads 4k,64k,1m]
    .venv/bin/python -m bench.bench_rewind --runs 1 --fs xfs,ext4 --workloads 4k --profile

Per run, file system and workload: a primary and a secondary (`retain: 2GiB`,
journal_size 512MiB: the window's records stay far below half of it) on loopback, their
state dirs and volumes on the file system: "xfs" is one made with `mkfs.xfs -m
reflink=1` on a loop file under /var/tmp (the copy of the volume is a reflink), "ext4"
is the machine's /var/tmp (no reflink: the copy is every data extent of the volume).
The 1 GiB volume is full: both nodes' image files get the same random bytes before the
agents start, and the target's initial sync is assume-clean (so the window holds only
what comes after). Then `replicator mark db m` on the primary, fio writes 100 MiB
through the primary's NBD export (4k: random 4 KiB writes; 64k: random 64 KiB writes;
1m: sequential 1 MiB writes; iodepth 16, no block written twice), and once the secondary
applied everything:

- retained: the secondary's status `window.retained_bytes` divided by the bytes fio
  wrote (everything written inside the window; fio's write_iolog lists them);
- warm: time `replicator rewind db --to m --copy DIR` on the secondary (the CLI's wall
  time, and the `seconds` the agent reports: the CLI's own Python start is ~0.15 s),
  the page cache as the writes left it (a recent point); then time the reference: the
  changed bytes copied once, i.e. every extent fio wrote (merged, in offset order) read
  from the rewind copy (which is the image at the marker: the old content) and written
  at its offset into a new sparse file, then fdatasync;
- cold: the same two again (rewind into a second directory), each after a sync and a
  drop of the page cache (an old point: nothing of it cached).

Medians of the runs go to stdout and bench/results/rewind.json. --profile adds, per
file system and workload of the first run, a cProfile of the rewind's own work done
in-process on the stopped secondary's state (snapshot._copy of the volume, then
History.undo back to the marker, then fdatasync), cold and warm, written to
bench/results/profile-rewind-FS-WORKLOAD.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_file import RESULTS, medians, run_line, save  # noqa: E402
from replicator.group.history import History  # noqa: E402
from replicator.snapshot import _copy  # noqa: E402
from replicator.volume import Volume  # noqa: E402
from tests.agents import MiB, Topology, loop_fs, replicator_cli  # noqa: E402
from tests.clients import run  # noqa: E402

GiB = 1 << 30
WORKLOADS = {"4k": ("randwrite", "4k"), "64k": ("randwrite", "64k"), "1m": ("write", "1M")}


def fill(paths: list[str], size: int) -> None:
    """The same random bytes in every image file, durably."""
    fds = []
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        for off in range(0, size, 4 * MiB):
            chunk = os.urandom(min(4 * MiB, size - off))
            for fd in fds:
                os.pwrite(fd, chunk, off)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def written_extents(iolog: str) -> list[tuple[int, int]]:
    """fio's write_iolog (version 3: time file action offset length) as merged
    (offset, length) extents in offset order."""
    writes = []
    with open(iolog) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[-3] == "write":
                writes.append((int(parts[-2]), int(parts[-1])))
    merged: list[list[int]] = []
    for off, n in sorted(writes):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + n - merged[-1][0])
        else:
            merged.append([off, n])
    return [(off, n) for off, n in merged]


def copy_changed(src: str, dst: str, extents, size: int) -> None:
    """The reference: each changed extent's content read once and written once."""
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd_out, size)
        for off, n in extents:
            os.pwrite(fd_out, os.pread(fd_in, n, off), off)
        os.fdatasync(fd_out)
    finally:
        os.close(fd_in)
        os.close(fd_out)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def one(base: str, fs: str, workload: str, volume: int, written: int,
        profile: bool) -> dict:
    root = tempfile.mkdtemp(prefix=f"rewind-{workload}-", dir=base)
    topo = Topology(root, ["a", "b"], [("a", "b", "async", {"initial_sync": "assume-clean"})],
                    volumes={"data": volume}, journal_size="512MiB",
                    node_options={"b": {"retain": "2GiB"}})
    a, b = topo["a"], topo["b"]
    try:
        fill([a.volume_path("db", "data"), b.volume_path("db", "data")], volume)
        topo.start()
        topo.wait_converged(120)
        rc, m = replicator_cli(a, "mark", "db", "m")
        assert rc == 0, m
        rw, bs = WORKLOADS[workload]
        iolog = os.path.join(root, "iolog")
        run(["fio", "--name=w", "--ioengine=nbd", f"--uri={a.nbd_uri('data')}", f"--rw={rw}",
             f"--bs={bs}", "--iodepth=16", f"--size={volume}", f"--io_size={written}",
             f"--write_iolog={iolog}", "--output=/dev/null"], timeout=600)
        extents = written_extents(iolog)
        changed = sum(n for _, n in extents)
        assert changed == written, (changed, written)
        seq = topo.wait_converged(600)
        window = b.group("db")["window"]
        assert window["from_seq"] < m["seq"] and window["to_seq"] == seq, window
        out = {"retained_per_written": window["retained_bytes"] / written,
               "history_per_written": window["history_bytes"] / written}
        copies = os.path.join(root, "copies")
        os.makedirs(copies)
        for cache in ("warm", "cold"):
            if cache == "cold":
                drop_caches()
            copy = os.path.join(copies, cache)
            with sampled(b, f"{fs}-{workload}-{cache}" if profile else None):
                wall, (rc, r) = timed(replicator_cli, b, "rewind", "db", "--to", "m",
                                      "--copy", copy)
            assert rc == 0, r
            assert r["copy"]["seq"] == m["seq"] and r["copy"]["rewound_from"] == seq, r
            if cache == "cold":
                drop_caches()
            ref, _ = timed(copy_changed, os.path.join(copy, "data.img"),
                           os.path.join(copies, f"{cache}-ref.img"), extents, volume)
            out.update({f"{cache}_rewind_s": wall, f"{cache}_agent_s": r["seconds"],
                        f"{cache}_reference_s": ref, f"{cache}_ratio": wall / ref,
                        f"{cache}_agent_ratio": r["seconds"] / ref})
        if profile:
            b.stop()
            profile_rewind(b, m["seq"], volume, os.path.join(copies, "profile"),
                           os.path.join(RESULTS, f"profile-rewind-{fs}-{workload}.txt"))
        return out
    finally:
        topo.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def sampled(agent, name: str | None):
    """py-spy (when installed; its pip package, not one of the project's) sampling the
    agent meanwhile, every thread, idle ones too: its stacks (raw: collapsed, with
    counts) in bench/results/pyspy-rewind-NAME.raw, the busy ones' top leaf frames in
    pyspy-rewind-NAME.txt."""
    if name is None or shutil.which("py-spy") is None:
        yield
        return
    raw = os.path.join(RESULTS, f"pyspy-rewind-{name}.raw")
    os.makedirs(RESULTS, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(agent.proc.pid), "--idle",
                            "--threads", "--rate", "500", "--format", "raw", "-o", raw],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # it attaches while the CLI's Python starts (~0.15 s), before the agent works
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    leaves: Counter = Counter()
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if any(fr.startswith(("_WorkItem.run ", "rewind ", "take ")) for fr in frames):
                leaves[" <- ".join(reversed(frames[-2:]))] += int(count)
    total = sum(leaves.values())
    with open(raw[:-4] + ".txt", "w") as f:
        f.write(f"{total} samples (500/s) of the agent's busy stacks (worker threads' work "
                f"items, the rewind coroutine), by leaf frame <- its caller:\n")
        for frame, n in leaves.most_common(15):
            f.write(f"{n:6d} {n / total:6.1%}  {frame}\n")


def profile_rewind(agent, mark_seq: int, volume: int, directory: str, path: str) -> None:
    """The rewind's work in this process on the stopped secondary's state: the copy of
    the volume as snapshot.take makes it, History.undo onto it back to the marker, the
    copy's fdatasync (snapshot.rewind less the event loop and the admin request)."""
    history = History(os.path.join(agent.config["state_dir"], "groups", "db", "history"),
                      images=True)
    applied = history.open()
    src = Volume("data", agent.volume_path("db", "data"), volume)
    src.open()
    os.makedirs(directory)
    report = io.StringIO()
    try:
        for cache in ("cold", "warm"):
            if cache == "cold":
                drop_caches()
            copy = Volume("data", os.path.join(directory, f"{cache}.img"), volume)
            copy.open()
            prof = cProfile.Profile()
            start = time.perf_counter()
            prof.enable()
            _copy(src.fd, copy.fd, volume)
            undone = history.undo(mark_seq, applied, lambda name, off, data: copy.write(off, data))
            copy.sync()
            prof.disable()
            took = time.perf_counter() - start
            copy.close()
            report.write(f"=== {cache}: {took:.3f} s, {undone} bytes undone "
                         f"(seq {applied} back to {mark_seq})\n")
            for key in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=report).sort_stats(key).print_stats(12)
    finally:
        src.close()
        history.close()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(report.getvalue())
    print(report.getvalue().split("\n", 1)[0], "->", path, flush=True)


@contextlib.contextmanager
def file_system(fs: str):
    """Where a run's directories go: an XFS with reflink on a loop file, or /var/tmp."""
    if fs == "ext4":
        yield "/var/tmp"
        return
    mount = tempfile.mkdtemp(prefix="bench-rewind-xfs-", dir="/var/tmp")
    try:
        with loop_fs(mount, "xfs", size="8G") as path:
            yield path
    finally:
        os.rmdir(mount)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fs", default="xfs,ext4", help="xfs (reflink, on a loop file), ext4")
    ap.add_argument("--workloads", default="4k,64k,1m", help=", ".join(WORKLOADS))
    ap.add_argument("--volume-mib", type=int, default=1024)
    ap.add_argument("--written-mib", type=int, default=100)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    fss, workloads = args.fs.split(","), args.workloads.split(",")
    for name in fss:
        if name not in ("xfs", "ext4"):
            ap.error(f"--fs {name}: expected xfs or ext4")
    for name in workloads:
        if name not in WORKLOADS:
            ap.error(f"--workloads {name}: expected one of {', '.join(WORKLOADS)}")
    runs = []
    with contextlib.ExitStack() as stack:
        bases = {fs: stack.enter_context(file_system(fs)) for fs in fss}
        for n in range(1, args.runs + 1):
            out = {}
            for fs in fss:
                for wl in workloads:
                    one_out = one(bases[fs], fs, wl, args.volume_mib * MiB,
                                  args.written_mib * MiB, args.profile and n == 1)
                    out.update({f"{fs}_{wl}_{k}": v for k, v in one_out.items()})
            run_line(n, out)
            runs.append(out)
    save("rewind", {"volume_mib": args.volume_mib, "written_mib": args.written_mib,
                    "medians": medians(runs), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
