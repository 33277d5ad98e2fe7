"""Watch capture benchmarks (issue 16), each side by side with its reference in one run.

    .venv/bin/python -m bench.bench_watch [--runs 3] [--size 1G] [--idle-size 10G]
                                          [--idle-seconds 60] [--sqlite-seconds 20]

1. epoch vs rsync: a watched 1 GiB file on XFS (reflink=1, a loop image), 1% of its
   64 KiB blocks rewritten in place by a plain writer; from the end of the writes until
   the replica (another agent over loopback) applied the epoch, vs `rsync --inplace
   --no-whole-file --ignore-times` of the same change into the file's previous copy
   (page cache warm for both).
2. idle CPU: the agent watching an idle 10 GiB file (fallocated: every block allocated)
   with a replica, its utime + stime over 60 s, from 5 s after the first capture and the
   initial sync are done, as a share of one core.
3. sqlite: a writer committing transactions as fast as it goes (WAL with sqlite's
   defaults, synchronous FULL, one row inserted and one updated per transaction) for N
   seconds on XFS, alone and watched (the database and its -wal as the two volumes of
   one group, consistency hooks with fsfreeze -f / -u of their file system, the default
   interval): commits/s watched / alone, which of the two goes first alternating.
Medians of the runs and their ratios go to stdout and bench/results/watch.json.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_core import cpu_seconds  # noqa: E402
from bench.bench_resync import GRAN, RSYNC, regions, timed, warm  # noqa: E402
from bench.results_file import each_run, medians, run_line, save  # noqa: E402
from replicator.config import parse_size  # noqa: E402
from tests.agents import MiB, Topology, loop_fs, wait_until  # noqa: E402

SETTLE_SECONDS = 5
SQLITE_WRITER = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, pad BLOB)")
    end, n = time.monotonic() + float(sys.argv[2]), 0
    while time.monotonic() < end:
        n += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, randomblob(?))", (n, 200 + n % 1000))
        db.execute("UPDATE t SET pad = randomblob(300) WHERE id = ?", (max(1, n // 3),))
        db.execute("COMMIT")
    print(n)
""")


def watched_pair(root: str, paths: dict[str, str], sizes: dict[str, int], **group) -> Topology:
    """Agent p watches `paths` (volume name -> file; group db), agent r replicates them."""
    topo = Topology(root, ["p", "r"], [("p", "r", "async", {"initial_sync": "checksum"})],
                    volumes=sizes, journal_size="256MiB", node_options={"p": group})
    for node in ("p", "r"):
        for vol in topo[node].config["groups"][0]["volumes"]:
            vol["capture"] = "watch"
            if node == "p":
                vol["path"] = paths[vol["name"]]
        topo[node].save_config()
    return topo


def caught_up(topo: Topology) -> bool:
    p, r = topo["p"].group("db"), topo["r"].group("db")
    t = p["targets"][0]
    return p["watch"]["state"] == "idle" and t["state"] == "replicating" and \
        t.get("resync") is None and r["applied_seq"] == p["seq"]


def epoch_vs_rsync(root: str, size: int, seed: int) -> dict:
    out = {}
    with loop_fs(os.path.join(root, "fs"), "xfs", f"{3 * size // MiB + 512}M") as mnt:
        path = os.path.join(mnt, "vm.img")
        with open(path, "wb") as f:  # distinct content in every block
            rng = random.Random(seed)
            for _ in range(size // MiB):
                f.write(rng.randbytes(MiB))
        topo = watched_pair(root, {"db": path}, {"db": size}, interval=10, quiet=0.05)
        try:
            topo.start()
            wait_until(lambda: caught_up(topo), 300, "the first capture and sync")
            old = os.path.join(root, "old.img")  # the previous version, for rsync
            subprocess.run(["cp", "--reflink=never", path, old], check=True)
            changed = regions(size, seed)
            seq = topo["p"].group("db")["seq"]
            warm(path)
            rng = random.Random(seed + 1)
            with open(path, "r+b") as f:
                for r in changed:
                    os.pwrite(f.fileno(), rng.randbytes(GRAN), r * GRAN)
            start = time.monotonic()
            wait_until(lambda: topo["p"].group("db")["seq"] > seq and caught_up(topo), 120,
                       "the epoch at the replica", interval=0.005)
            out["epoch_s"] = time.monotonic() - start  # includes the 0.05 s quiet period
            last = topo["p"].group("db")["watch"]["last_epoch"]
            out["find_ms"], out["capture_ms"] = last["find_ms"], last["capture_ms"]
            out["epoch_bytes"] = last["bytes"]
            warm(path, old)
            out["rsync_s"] = timed(RSYNC + [path, old])
            subprocess.run(["cmp", path, old], check=True)
            with open(topo["r"].volume_path("db", "db"), "rb") as a, open(path, "rb") as b:
                assert a.read() == b.read(), "the replica differs from the watched file"
            out["blocks_changed"] = len(changed)
        finally:
            topo.stop()
    return out


def idle_cpu(root: str, size: int, seconds: int) -> dict:
    with loop_fs(os.path.join(root, "fs"), "xfs", f"{size // MiB + 1024}M") as mnt:
        path = os.path.join(mnt, "big.img")
        subprocess.run(["fallocate", "-l", str(size), path], check=True)
        topo = watched_pair(root, {"db": path}, {"db": size})
        try:
            topo.start()
            wait_until(lambda: caught_up(topo), 600, "the first capture and sync")
            time.sleep(SETTLE_SECONDS)  # the initial sync's tail (page cache, bitmaps) is not idle
            pid = topo["p"].proc.pid
            before, t0 = sum(cpu_seconds(pid)), time.monotonic()
            time.sleep(seconds)  # the measurement itself: the agent's CPU over this span
            used, span = sum(cpu_seconds(pid)) - before, time.monotonic() - t0
            epochs = topo["p"].group("db")["watch"]["epochs"]
        finally:
            topo.stop()
    return {"idle_cpu_pct": 100 * used / span, "idle_epochs": epochs}


def sqlite_rate(root: str, seconds: int, watched: bool) -> float:
    """Commits/s of the writer on XFS, alone or watched: the database and its WAL are the
    two volumes of one group, captured between fsfreeze -f and -u of their file system
    (consistency hooks), so the pair is one instant of the database."""
    with loop_fs(os.path.join(root, "fs"), "xfs", "1G") as mnt:
        db = os.path.join(mnt, "app.db")
        topo = None
        if watched:
            topo = watched_pair(root, {"db": db, "wal": db + "-wal"},
                                {"db": 256 * MiB, "wal": 64 * MiB}, consistency="hooks",
                                freeze=f"fsfreeze -f {mnt}", thaw=f"fsfreeze -u {mnt}")
            topo.start()
            wait_until(lambda: caught_up(topo), 60, "the first capture")
        try:
            done = subprocess.run([sys.executable, "-c", SQLITE_WRITER, db, str(seconds)],
                                  check=True, capture_output=True, text=True)
            if topo is not None:
                wait_until(lambda: caught_up(topo), 120, "the last epoch")
        finally:
            if topo is not None:
                topo.stop()
    return int(done.stdout) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--idle-size", default="10G")
    ap.add_argument("--idle-seconds", type=int, default=60)
    ap.add_argument("--sqlite-seconds", type=int, default=20)
    args = ap.parse_args()
    size, idle = parse_size(args.size, "--size"), parse_size(args.idle_size, "--idle-size")
    runs = []
    for n, root in each_run(args.runs, "bench-watch-"):
        out = epoch_vs_rsync(os.path.join(root, "epoch"), size, seed=n)
        out["epoch_speedup"] = out["rsync_s"] / out["epoch_s"]
        out |= idle_cpu(os.path.join(root, "idle"), idle, args.idle_seconds)
        order = (False, True) if n % 2 else (True, False)  # which goes first alternates
        rate = {w: sqlite_rate(os.path.join(root, f"sqlite-{w}"), args.sqlite_seconds, w)
                for w in order}
        alone, watched = rate[False], rate[True]
        out |= {"sqlite_alone_cps": alone, "sqlite_watched_cps": watched,
                "sqlite_ratio": watched / alone}
        run_line(n, out)
        runs.append(out)
    m = medians(runs)
    save("watch", {"size": size, "idle_size": idle, "medians": m, "runs": runs,
                   "goals": {"epoch_speedup": ">= 5", "idle_cpu_pct": "<= 1",
                             "sqlite_ratio": ">= 0.9"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
