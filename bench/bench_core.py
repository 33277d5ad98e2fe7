"""The write path's benchmarks (issues 2 and 14), side by side with qemu-nbd in one run.

    .venv/bin/python -m bench.bench_core [--runs 3] [--seconds 20] [--copy-size 1G]
                                         [--cases randwrite,fsync16,...] [--dir DIR]

The cases (default: all), each a row of issue 14's table (the demo, verify and outage
rows are measured elsewhere); "the agent" is a primary `p` with a target `t`, a second
agent on loopback; the reference is `qemu-nbd -f raw` on a plain sparse file:

- randwrite: fio --ioengine=nbd 4 KiB randwrite, iodepth 16, one async target, vs
  qemu-nbd --cache=writeback; in the same fio runs, the CPU per write (user + system
  from /proc/<pid>/stat over the fio run) of the primary agent process vs qemu-nbd's.
- fsync16: the same job with --fsync=16 (a FLUSH after every 16 writes) on both.
- copy: nbdcopy of a random file of --copy-size into each, then the same with --flush
  on both sides, with the bytes the disk took during each copy.
- sync_fsync: a sync target, fio iodepth 1 with --fsync=1: p50 of a write plus p50 of
  its flush vs a floor measured in the same run (a local 4 KiB write+fdatasync, a
  loopback round trip, a remote 4 KiB write+fdatasync).
- sync_write: a sync target, fio iodepth 1 without flushes, write p50 vs a floor
  measured in the same run (loopback round trip plus two 4 KiB writes into a file's
  page cache, one on each side, no fdatasync).
- durability_write: a group with `durability: write`, randwrite iodepth 16 vs
  qemu-nbd --cache=writethrough.
- multigroup: one agent with 16 groups of 2 volumes, each group with an async target
  on a second agent; aggregate IOPS of 8 fio jobs at once on 8 volumes of 8 groups
  (iodepth 16 each) vs one such job alone on one of them; peak RSS (VmHWM) of the
  primary and, in a row of its own, of the target (it holds the 16 groups too).

Per run, each family of cases gets a fresh pair (and qemu-nbd); the steps alternate
between agent and reference, each starting on a pair that has caught up (no initial
sync or backlog running) after `sync` and `drop_caches`. Medians over the runs and
their ratios go to bench/results/core.json (every run's figures too) and to stdout as
a markdown table with each row's goal and whether it was met. Everything runs in a
temporary directory under --dir (default /var/tmp: the file system of state dirs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.agents import MiB, Topology, free_port, wait_until  # noqa: E402

CASES = ("randwrite", "fsync16", "copy", "sync_fsync", "sync_write", "durability_write",
         "multigroup")
MULTI_GROUPS, MULTI_VOLUMES, MULTI_JOBS = 16, 2, 8
RSS_GOAL_MIB = 150


def settle_memory() -> None:
    """Each measurement starts from the same memory and disk state: nothing dirty left
    by the step before (sync), nothing it cached (drop_caches). On this VM, a page
    cache left large by the previous step halved qemu-nbd's copy speed."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process, waited-for children included."""
    with open(f"/proc/{pid}/stat") as f:
        utime, stime, cutime, cstime = (int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15])
    tick = os.sysconf("SC_CLK_TCK")
    return (utime + cutime) / tick, (stime + cstime) / tick


def fio_command(uris: str | list[str], *, iodepth: int, seconds: int, size: str,
                rw: str = "randwrite", extra: tuple[str, ...] = ()) -> list:
    """The 4 KiB fio job over NBD every benchmark of the write path runs (JSON output):
    one job per URI, all at once, reported as one (--group_reporting)."""
    uris = [uris] if isinstance(uris, str) else uris
    cmd = ["fio", "--ioengine=nbd", f"--rw={rw}", "--bs=4k", f"--iodepth={iodepth}",
           f"--size={size}", f"--runtime={seconds}", "--time_based", "--group_reporting",
           "--output-format=json", *extra]
    for i, uri in enumerate(uris):
        cmd += [f"--name=bench{i}", f"--uri={uri}"]
    return cmd


def fio(uris: str | list[str], *, iodepth: int, seconds: int, size: str,
        extra: tuple[str, ...] = (), cpu_pids: dict[str, int] | None = None) -> dict:
    """Run the fio job after settle_memory: IOPS, write completion latency p50/p99 (µs),
    the flushes' p50 when it issues any, and the CPU per write (µs, user + system over
    the whole fio run) of each process in `cpu_pids`."""
    settle_memory()
    pids = cpu_pids or {}
    c0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    p = subprocess.run(fio_command(uris, iodepth=iodepth, seconds=seconds, size=size,
                                   extra=extra), capture_output=True, text=True)
    c1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    if p.returncode != 0:
        raise RuntimeError(f"fio exited {p.returncode}: {p.stderr[-2000:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    write, pct = job["write"], job["write"]["clat_ns"]["percentile"]
    out = {"iops": write["iops"], "writes": write["total_ios"],
           "p50_us": pct["50.000000"] / 1000, "p99_us": pct["99.000000"] / 1000}
    if job["sync"]["total_ios"]:
        out["flush_p50_us"] = job["sync"]["lat_ns"]["percentile"]["50.000000"] / 1000
    if pids:
        out["cpu_us_per_write"] = {
            name: (sum(c1[name]) - sum(c0[name])) / write["total_ios"] * 1e6 for name in pids}
    return out


class QemuNbd:
    """The reference: `qemu-nbd -f raw` with `cache` serving a sparse file of `size`."""

    def __init__(self, path: str, size: int, cache: str = "writeback"):
        self.path = path
        with open(path, "wb") as f:
            f.truncate(size)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", f"--cache={cache}", "-t", "-e", "8", "-b", "127.0.0.1",
             "-p", str(self.port), "-x", "data", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: socket.create_connection(("127.0.0.1", self.port), 1).close()
                       or True, 10, "qemu-nbd to listen")
        except BaseException:
            self.stop()
            raise
        self.uri = f"nbd://127.0.0.1:{self.port}/data"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> "QemuNbd":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def converge(topo: Topology) -> None:
    """Wait until every group of the pair is caught up: every record applied on the
    target, every link replicating, a sync target in sync."""
    for group in topo.groups:
        topo.wait_converged(300, group=group)
        for t in topo["p"].group(group)["targets"]:
            if t["mode"] == "sync":
                wait_until(lambda: topo["p"].target(group, t["node"])["in_sync"], 60,
                           f"sync target of {group} in sync")


@contextlib.contextmanager
def agent_pair(root: str, mode: str, *, vol_size: int, journal_size: str, groups: int = 1,
               volumes: int = 1, group_options: dict | None = None):
    """Primary `p` and target `t` on loopback with `groups` groups g0, g1, ... of
    `volumes` volumes g<i>v<j> each, every group with `t` as its `mode` target; yields
    the Topology (`topo.groups`: group -> volume names) once it has caught up; stopped
    and removed on exit, whatever happened."""
    names = {f"g{i}": [f"g{i}v{j}" for j in range(volumes)] for i in range(groups)}
    topo = Topology(root, ["p", "t"], [("p", "t", mode)], group="g0",
                    volumes={v: vol_size for v in names["g0"]}, journal_size=journal_size,
                    group_options=group_options)
    for agent in topo.agents.values():
        first = agent.config["groups"][0]
        for group, vols in list(names.items())[1:]:
            clone = copy.deepcopy(first)
            clone["name"] = group
            clone["volumes"] = [{"name": v, "size": vol_size,
                                 "path": os.path.join(agent.dir, "vol", f"{v}.img")} for v in vols]
            agent.config["groups"].append(clone)
        agent.save_config()
    topo.groups = names
    try:
        topo.start()
        converge(topo)
        yield topo
    finally:
        topo.stop()
        shutil.rmtree(root, ignore_errors=True)


def disk_bytes_written(path: str) -> int | None:
    """Bytes written so far to the block device holding `path` (None if it has none)."""
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
            return int(f.read().split()[6]) * 512  # sectors written
    except OSError:
        return None


def nbdcopy(src: str, uri: str, *flags: str) -> tuple[float, int | None]:
    """Seconds the copy took and bytes the disk under `src` took in meanwhile."""
    settle_memory()
    d0, t = disk_bytes_written(src), time.monotonic()
    subprocess.run(["nbdcopy", *flags, src, uri], check=True)
    seconds, d1 = time.monotonic() - t, disk_bytes_written(src)
    return seconds, None if d0 is None else d1 - d0


def latency_floor(directory: str, *, fdatasync: bool, n: int = 2000) -> dict:
    """What a write through a sync target cannot beat: a 4 KiB pwrite to a local file
    (then fdatasync if `fdatasync`), then a loopback round trip to a peer that does the
    same to its own file before answering. p50/p99 in µs."""
    block = os.urandom(4096)
    sync = os.fdatasync if fdatasync else (lambda fd: None)
    paths = [os.path.join(directory, f"floor-{side}") for side in ("local", "remote")]
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def peer():
        conn, _ = srv.accept()
        fd = os.open(paths[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for i in range(n):
                data = b""
                while len(data) < 4096:
                    chunk = conn.recv(4096 - len(data))
                    if not chunk:
                        return
                    data += chunk
                os.pwrite(fd, data, i * 4096)
                sync(fd)
                conn.sendall(b"k")
        finally:
            os.close(fd)
            conn.close()

    th = threading.Thread(target=peer, daemon=True)
    th.start()
    cli = socket.create_connection(srv.getsockname())
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = os.open(paths[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    samples = []
    try:
        for i in range(n):
            t = time.perf_counter()
            os.pwrite(fd, block, i * 4096)
            sync(fd)
            cli.sendall(block)
            if not cli.recv(1):
                raise RuntimeError("latency floor: the peer hung up")
            samples.append((time.perf_counter() - t) * 1e6)
    finally:
        cli.close()
        os.close(fd)
        th.join(5)
        srv.close()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    samples.sort()
    return {"p50_us": samples[len(samples) // 2], "p99_us": samples[int(len(samples) * 0.99)]}


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# ---- the cases, one family (a pair, a reference) at a time ------------------------------

def run_async_family(root: str, cases: set, args, src: str | None, vol_size: int) -> dict:
    """randwrite (and CPU per write), fsync16 and copy on one async pair and qemu-nbd
    --cache=writeback."""
    out: dict = {}
    with agent_pair(os.path.join(root, "async"), "async", vol_size=vol_size,
                    journal_size="1GiB") as topo, \
            QemuNbd(os.path.join(root, "qemu.img"), vol_size) as q:
        uri, p = topo["p"].nbd_uri("g0v0"), topo["p"].proc.pid
        for case, extra in (("randwrite", ()), ("fsync16", ("--fsync=16",))):
            if case in cases:
                agent = fio(uri, iodepth=16, seconds=args.seconds, size="256M", extra=extra,
                            cpu_pids={"agent": p})
                converge(topo)
                ref = fio(q.uri, iodepth=16, seconds=args.seconds, size="256M", extra=extra,
                          cpu_pids={"qemu_nbd": q.proc.pid})
                converge(topo)
                out[case] = {"agent": agent, "qemu_nbd": ref}
        if "copy" in cases:
            copies = {}
            for name, target, flags in (("agent", uri, ()), ("qemu_nbd", q.uri, ()),
                                        ("agent_flush", uri, ("--flush",)),
                                        ("qemu_nbd_flush", q.uri, ("--flush",))):
                seconds, disk = nbdcopy(src, target, *flags)
                converge(topo)
                copies[name] = {"seconds": seconds, "disk_bytes": disk}
            out["copy"] = copies
        out["peak_rss_kib"] = {n: peak_rss_kib(topo[n].proc.pid) for n in ("p", "t")}
    return out


def run_sync_family(root: str, cases: set, args) -> dict:
    """sync_fsync and sync_write on one sync pair, each with its floor right after."""
    out: dict = {}
    with agent_pair(os.path.join(root, "sync"), "sync", vol_size=256 * MiB,
                    journal_size="256MiB") as topo:
        uri = topo["p"].nbd_uri("g0v0")
        for case, extra, synced in (("sync_fsync", ("--fsync=1",), True),
                                    ("sync_write", (), False)):
            if case in cases:
                agent = fio(uri, iodepth=1, seconds=args.seconds, size="64M", extra=extra)
                converge(topo)
                out[case] = {"agent": agent, "floor": latency_floor(topo.root, fdatasync=synced)}
        out["peak_rss_kib"] = {n: peak_rss_kib(topo[n].proc.pid) for n in ("p", "t")}
    return out


def run_durability_write(root: str, args) -> dict:
    with agent_pair(os.path.join(root, "dw"), "async", vol_size=256 * MiB, journal_size="1GiB",
                    group_options={"durability": "write"}) as topo, \
            QemuNbd(os.path.join(root, "qemu-wt.img"), 256 * MiB, cache="writethrough") as q:
        agent = fio(topo["p"].nbd_uri("g0v0"), iodepth=16, seconds=args.seconds, size="256M")
        converge(topo)
        ref = fio(q.uri, iodepth=16, seconds=args.seconds, size="256M")
        return {"agent": agent, "qemu_nbd_writethrough": ref}


def run_multigroup(root: str, args) -> dict:
    with agent_pair(os.path.join(root, "multi"), "async", vol_size=64 * MiB,
                    journal_size="128MiB", groups=MULTI_GROUPS, volumes=MULTI_VOLUMES) as topo:
        vols = [topo.groups[f"g{i}"][i % MULTI_VOLUMES] for i in range(MULTI_JOBS)]
        one = fio(topo["p"].nbd_uri(vols[0]), iodepth=16, seconds=args.seconds, size="64M")
        converge(topo)
        many = fio([topo["p"].nbd_uri(v) for v in vols], iodepth=16, seconds=args.seconds,
                   size="64M")
        converge(topo)
        return {"one_group": one, "jobs_at_once": many,
                "peak_rss_kib": {n: peak_rss_kib(topo[n].proc.pid) for n in ("p", "t")}}


# ---- the table -----------------------------------------------------------------------

def summarize(runs: list[dict], copy_bytes: int) -> list[dict]:
    """Issue 14's rows for the cases that ran: medians over the runs and their ratio."""
    def med(case, *path):
        values = []
        for r in runs:
            v = r[case]
            for key in path:
                v = v[key]
            values.append(v)
        return statistics.median(values)

    rows = []

    def row(label, agent, ref, ratio, op, goal, unit=""):
        met = ratio >= goal if op == ">=" else ratio <= goal
        rows.append({"measurement": label, "agent": f"{agent:,.0f}{unit}",
                     "reference": f"{ref:,.0f}{unit}" if isinstance(ref, (int, float)) else ref,
                     "ratio": round(ratio, 3), "goal": f"{op} {goal}", "met": met})

    have = runs[0].keys()
    if "randwrite" in have:
        a, q = med("randwrite", "agent", "iops"), med("randwrite", "qemu_nbd", "iops")
        row("fio 4k randwrite QD16, one async target (IOPS)", a, q, a / q, ">=", 1.0)
    if "fsync16" in have:
        a, q = med("fsync16", "agent", "iops"), med("fsync16", "qemu_nbd", "iops")
        row("the same with --fsync=16 (IOPS)", a, q, a / q, ">=", 0.7)
    if "sync_fsync" in have:
        a = med("sync_fsync", "agent", "p50_us") + med("sync_fsync", "agent", "flush_p50_us")
        f = med("sync_fsync", "floor", "p50_us")
        row("sync target, QD1 --fsync=1: p50 write + p50 flush vs floor (µs)", a,
            f"floor {f:,.0f} µs", a / f, "<=", 1.3, " µs")
    if "sync_write" in have:
        a, f = med("sync_write", "agent", "p50_us"), med("sync_write", "floor", "p50_us")
        row("sync target, QD1 write without flush: p50 vs floor (µs)", a, f"floor {f:,.0f} µs",
            a / f, "<=", 1.3, " µs")
    if "copy" in have:
        mbps = {k: copy_bytes / med("copy", k, "seconds") / 1e6
                for k in ("agent", "qemu_nbd", "agent_flush", "qemu_nbd_flush")}
        row(f"nbdcopy {copy_bytes >> 20} MiB (MB/s)", mbps["agent"], mbps["qemu_nbd"],
            mbps["agent"] / mbps["qemu_nbd"], ">=", 0.8)
        row("nbdcopy --flush on both (MB/s)", mbps["agent_flush"], mbps["qemu_nbd_flush"],
            mbps["agent_flush"] / mbps["qemu_nbd_flush"], ">=", 0.5)
    if "randwrite" in have:
        a = med("randwrite", "agent", "cpu_us_per_write", "agent")
        q = med("randwrite", "qemu_nbd", "cpu_us_per_write", "qemu_nbd")
        rows.append({"measurement": "CPU per write, primary agent vs qemu-nbd (user+system µs, "
                                    "randwrite runs)", "agent": f"{a:.1f} µs",
                     "reference": f"{q:.1f} µs", "ratio": round(a / q, 3), "goal": "<= 1.5",
                     "met": a / q <= 1.5})
    if "durability_write" in have:
        a = med("durability_write", "agent", "iops")
        q = med("durability_write", "qemu_nbd_writethrough", "iops")
        row("durability: write, randwrite QD16 vs qemu-nbd --cache=writethrough (IOPS)", a, q,
            a / q, ">=", 1.0)
    if "multigroup" in have:
        many, one = med("multigroup", "jobs_at_once", "iops"), med("multigroup", "one_group", "iops")
        row(f"{MULTI_GROUPS} groups x {MULTI_VOLUMES} volumes, {MULTI_JOBS} fio jobs at once: "
            "aggregate vs one group alone (IOPS)", many, f"{one:,.0f} alone", many / one, ">=", 0.9)
        for node, role in (("p", "primary"), ("t", "target")):
            rss = max(r["multigroup"]["peak_rss_kib"][node] for r in runs) / 1024
            rows.append({"measurement": f"peak RSS (VmHWM) of the {MULTI_GROUPS}-group {role}, "
                                        "max over the runs", "agent": f"{rss:.1f} MiB",
                         "reference": "", "ratio": None, "goal": f"<= {RSS_GOAL_MIB} MiB",
                         "met": rss <= RSS_GOAL_MIB})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| measurement | agent | reference | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['measurement']} | {r['agent']} | {r['reference']} | {ratio} | "
                     f"{r['goal']} | {'met' if r['met'] else 'not met'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--copy-size", default="1G")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, of: {', '.join(CASES)} (default: all)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir under /var/tmp)")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    if not cases <= set(CASES):
        ap.error(f"unknown cases: {', '.join(sorted(cases - set(CASES)))}")
    copy_bytes = int(args.copy_size[:-1]) << {"M": 20, "G": 30}[args.copy_size[-1]]
    work = tempfile.mkdtemp(prefix="replicator-bench-", dir=args.dir or "/var/tmp")
    runs: list[dict] = []
    try:
        src = None
        if "copy" in cases:
            src = os.path.join(work, "source.img")
            with open(src, "wb") as f:
                for _ in range(copy_bytes // (16 * MiB)):
                    f.write(os.urandom(16 * MiB))
        for n in range(args.runs):
            root = os.path.join(work, f"run{n}")
            run: dict = {}
            if cases & {"randwrite", "fsync16", "copy"}:
                family = run_async_family(root, cases, args, src, max(copy_bytes, 256 * MiB))
                run["async_peak_rss_kib"] = family.pop("peak_rss_kib")
                run.update(family)
            if cases & {"sync_fsync", "sync_write"}:
                family = run_sync_family(root, cases, args)
                run["sync_peak_rss_kib"] = family.pop("peak_rss_kib")
                run.update(family)
            if "durability_write" in cases:
                run["durability_write"] = run_durability_write(root, args)
            if "multigroup" in cases:
                run["multigroup"] = run_multigroup(root, args)
            runs.append(run)
            print(f"run {n + 1}/{args.runs}: {json.dumps(run)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = summarize(runs, copy_bytes)
    results = {"runs": runs, "seconds": args.seconds, "copy_bytes": copy_bytes,
               "cases": sorted(cases), "summary": rows}
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "core.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
