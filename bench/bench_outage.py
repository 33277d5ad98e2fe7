"""Outage of 1% of a 1 GiB volume (issue 14): wall time from the target's process start
to `replicating`, vs rsync of the same change; goal >= 2x faster.

    .venv/bin/python -m bench.bench_outage [--runs 3] [--size 1G] [--kill]

Per run: two agents on loopback (`a` primary, `b` its async target, one group, one
volume of incompressible data under /var/tmp, started from identical files with
`initial_sync: none`). `b` is stopped (SIGTERM; --kill: kill -9); a copy of `b`'s image
is kept; 1% of the volume is rewritten through `a`'s NBD export by one qemu-io, in
writes of 4 KiB..64 KiB (4 KiB aligned) at random offsets; once the primary reports
`b` in logging (away longer than heartbeat_timeout, 5 s), `sync` and `drop_caches`, and
`b` is started: the figure is the wall time from starting its process
to the primary reporting it `replicating` (caught up, no resync running), split into
the time until its replication port accepts and the rest. The reference, after the same
`sync` and `drop_caches`: `rsync --inplace --no-whole-file --ignore-times` (the delta
algorithm: local copies need --no-whole-file; --ignore-times so that the quick check
never skips the file) from the primary's image to the copy kept. Both copies are then
compared with the primary's image. Medians of the runs and their ratio go to stdout and
bench/results/outage.json.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_resync import RSYNC, replicating, timed  # noqa: E402
from bench.results_file import each_run, medians, run_line, save  # noqa: E402
from replicator.config import parse_size  # noqa: E402
from tests.agents import MiB, Topology, wait_until  # noqa: E402

PAGE = 4096


def drop_caches() -> None:
    """Every timed side starts with a cold page cache (the volumes, the journal, the
    agent's own Python files)."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def scattered_writes(size: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) writes of 4 KiB..64 KiB at random 4 KiB-aligned offsets, totalling
    1% of `size` (overlaps allowed, as a real workload has them)."""
    rng = random.Random(seed)
    goal, total, out = size // 100, 0, []
    while total < goal:
        left = -(-(goal - total) // PAGE) * PAGE  # what is left, rounded up to a page
        length = min(rng.randint(1, 16) * PAGE, left)
        out.append((rng.randrange(0, (size - length) // PAGE + 1) * PAGE, length))
        total += length
    return out


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def fill(path: str, size: int, seed: int) -> None:
    """Incompressible content, different in every MiB (no rsync block matches by luck)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))


def one_run(root: str, size: int, seed: int, kill: bool) -> dict:
    topo = Topology(root, ["a", "b"], [("a", "b", "async", {"initial_sync": "none"})],
                    volumes={"data": size}, journal_size="64MiB", heartbeat_timeout=5.0)
    a, b = topo["a"], topo["b"]
    pa, pb = a.volume_path("db", "data"), b.volume_path("db", "data")
    for p in (pa, pb):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    fill(pa, size, seed)
    shutil.copyfile(pa, pb)
    old = os.path.join(root, "before-outage.img")
    out: dict = {}
    try:
        topo.start()
        wait_until(lambda: replicating(a), 60, "a -> b replicating")
        b.kill(signal.SIGKILL if kill else signal.SIGTERM)
        shutil.copyfile(pb, old)  # the target's image from before the outage
        writes = scattered_writes(size, seed)
        cmds = []
        for i, (off, length) in enumerate(writes):
            cmds += ["-c", f"write -P {i % 251 + 1} {off} {length}"]
        subprocess.run(["qemu-io", "-f", "raw", *cmds, a.nbd_uri("data")], check=True,
                       capture_output=True)
        out["writes"] = len(writes)
        out["written_bytes"] = sum(length for _, length in writes)
        # Away longer than heartbeat_timeout: the primary has gone to logging, so what
        # `b` lacks is in the dirty-region bitmap (the journal would hold it too).
        wait_until(lambda: a.target("db", "b")["state"] == "logging", 30, "b logging")
        out["dirty_bytes"] = a.target("db", "b")["dirty_bytes"]
        port = int(b.config["listen"].rsplit(":", 1)[1])
        drop_caches()
        start = time.monotonic()
        b.start(wait=False)
        wait_until(lambda: accepts(port), 60, "b listening", interval=0.005)
        out["to_listen_s"] = time.monotonic() - start
        wait_until(lambda: replicating(a), 120, "b replicating", interval=0.01)
        out["wall_s"] = time.monotonic() - start
        out["listen_to_replicating_s"] = out["wall_s"] - out["to_listen_s"]
        with open(a.log_path) as f:
            done = [x for x in f if "resync complete" in x]
        if done:
            out["resync_s"] = float(re.search(r" in ([0-9.]+)s\)", done[-1]).group(1))
        topo.stop()
        drop_caches()
        out["rsync_s"] = timed(RSYNC + [pa, old])
        for copy in (pb, old):
            subprocess.run(["cmp", pa, copy], check=True)
    finally:
        topo.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--kill", action="store_true", help="stop the target with kill -9")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    runs = []
    for n, root in each_run(args.runs, "bench-outage-"):
        runs.append(one_run(root, size, seed=n, kill=args.kill))
        run_line(n, runs[-1])
    med = {k: v for k, v in medians(runs).items() if k.endswith("_s")}
    summary = {"size_bytes": size, "stop": "SIGKILL" if args.kill else "SIGTERM",
               "runs": runs, "median": med,
               "speedup_vs_rsync": med["rsync_s"] / med["wall_s"]}
    save("outage", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
