"""Online verify benchmark (issue 14): `replicator verify` of a 1 GiB volume between two
agents on loopback, page cache warm and cold, against what the disk reads.

    .venv/bin/python -m bench.bench_verify [--runs 3] [--size 1G]

Two agents (`a` primary, `b` async target, `initial_sync: none`) start from two
identical, separately written files of incompressible data under /var/tmp (the file
system a state dir would be on); each agent hashes its own copy (xxh3-128 per 64 KiB
region) and only the hashes cross the link. Per run:
1. warm: both files read into the page cache, then `replicator verify db b`;
2. cold: `sync` + `drop_caches` (root only), then `replicator verify db b`;
3. the disk: `sync` + `drop_caches`, then `cat a.img b.img > /dev/null` (both copies,
   one after the other, as the brief's reference), and the same two files read by two
   `cat`s at once (as the two agents read them).
GB/s is the volume's bytes (10^9) over the seconds the primary reports for the verify
(`seconds` of `replicator verify --json`); the cold ratio is cat's seconds over the cold
verify's, i.e. the verify's read rate of both copies as a fraction of cat's. Medians of
the runs go to stdout and bench/results/verify.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_file import medians, run_line, save  # noqa: E402
from replicator.config import parse_size  # noqa: E402
from tests.agents import MiB, Topology, replicator_cli, wait_until  # noqa: E402


def drop_caches() -> None:
    """Nothing dirty left (sync), nothing cached (drop_caches): a cold start."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def warm(*paths: str) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def write_image(path: str, size: int, seed: bytes) -> None:
    """`size` bytes of incompressible data, the same for the same seed; written (not
    copied), so no file system can share the two copies' blocks."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        block = hashlib.shake_256(seed).digest(MiB)
        for i in range(size // MiB):
            f.write(block[i % 4096:] + block[:i % 4096])
        f.flush()
        os.fsync(f.fileno())


def verify(agent) -> tuple[float, float]:
    """(seconds the primary reports, wall seconds of the CLI call)."""
    start = time.monotonic()
    rc, v = replicator_cli(agent, "verify", "db", "b")
    wall = time.monotonic() - start
    assert rc == 0 and not v["mismatches"], v
    return v["seconds"], wall


def cat_seconds(*paths: str, parallel: bool = False) -> float:
    start = time.monotonic()
    if parallel:
        procs = [subprocess.Popen(["cat", p], stdout=subprocess.DEVNULL) for p in paths]
        assert all(p.wait() == 0 for p in procs)
    else:
        subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1G")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_verify: run as root (the cold runs drop the page cache)", file=sys.stderr)
        return 1
    size = parse_size(args.size, "--size")
    root = tempfile.mkdtemp(prefix="bench-verify-", dir="/var/tmp")
    runs = []
    topo = None
    try:
        topo = Topology(root, ["a", "b"], [("a", "b", "async", {"initial_sync": "none"})],
                        volumes={"data": size}, journal_size="64MiB")
        a, b = topo["a"], topo["b"]
        pa, pb = a.volume_path("db", "data"), b.volume_path("db", "data")
        for p in (pa, pb):
            write_image(p, size, b"bench_verify")
        topo.start()
        wait_until(lambda: a.target("db", "b")["state"] == "replicating", 60, "a -> b replicating")
        for i in range(args.runs):
            out = {}
            warm(pa, pb)  # a verify drops what it read from the cache when done
            out["warm_s"], out["warm_wall_s"] = verify(a)
            drop_caches()
            out["cold_s"], out["cold_wall_s"] = verify(a)
            drop_caches()
            out["cat_both_s"] = cat_seconds(pa, pb)
            drop_caches()
            out["cat_parallel_s"] = cat_seconds(pa, pb, parallel=True)
            runs.append(out)
            run_line(i + 1, out)
    finally:
        if topo is not None:
            topo.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = medians(runs)
    gb = size / 1e9
    summary = {
        "size_bytes": size,
        "runs": runs,
        "median": med,
        "warm_GBps": gb / med["warm_s"],
        "cold_GBps": gb / med["cold_s"],
        "disk_both_GBps": 2 * gb / med["cat_both_s"],  # two copies read
        "disk_parallel_GBps": 2 * gb / med["cat_parallel_s"],
        "cold_vs_cat_both": med["cat_both_s"] / med["cold_s"],
        "cold_vs_cat_parallel": med["cat_parallel_s"] / med["cold_s"],
    }
    save("verify", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
