"""Outage benchmarks (issue 3), each side by side with the reference tool in one run.

    .venv/bin/python -m bench.bench_resync [--runs 3] [--size 1G]

1. resync after an outage: the target is stopped, 1% of the 64 KiB regions of the
   volume are rewritten through NBD on the primary, the target is started again; time
   until it is back to `replicating`, vs `rsync --inplace --no-whole-file` of the same
   change between two plain files.
2. checksum initial sync: the target's copy differs in 1% of its regions
   (`replicator resync --checksum`), vs the same rsync.
3. online verify of the volume (`replicator verify`, both agents hashing their own
   copy) vs `xxhsum` and `sha256sum` of both files, page cache warm for all.
4. resync throughput over a rate-limited link: the two agents in two network
   namespaces joined by a veth pair shaped with `tc qdisc ... tbf rate 100mbit` on
   the primary's side; bytes resynced / resync seconds vs the link rate.
Medians of the runs and their ratios go to stdout and bench/results/resync.json. Files
live under /var/tmp (same file system as a state dir would be).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_file import each_run, medians, run_line, save  # noqa: E402
from replicator.config import parse_size  # noqa: E402
from tests.agents import MiB, Topology, replicator_cli, wait_until  # noqa: E402

GRAN = 64 << 10
# --ignore-times: the quick check (size + mtime) must not skip the file
RSYNC = ["rsync", "--inplace", "--no-whole-file", "--ignore-times"]


def timed(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - start


def warm(*paths: str) -> None:
    """Read the files into the page cache: every timed step starts warm, whatever the
    step before left there (resync and verify drop what they read when done)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def regions(size: int, seed: int) -> list[int]:
    n = size // GRAN
    return sorted(random.Random(seed).sample(range(n), max(1, n // 100)))


def patch_file(path: str, offsets: list[int], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for r in offsets:
            f.seek(r * GRAN)
            f.write(rng.randbytes(GRAN))


def resync_seconds(agent) -> float:
    """The duration of the last resync, as the primary logged it."""
    with open(agent.log_path) as f:
        lines = [x for x in f if "resync complete" in x]
    return float(re.search(r" in ([0-9.]+)s\)", lines[-1]).group(1))


def replicating(agent) -> bool:
    t = agent.target("db", "b")
    return t["state"] == "replicating" and t["resync"] is None


def one_run(root: str, size: int, seed: int) -> dict:
    topo = Topology(root, ["a", "b"], [("a", "b", "async", {"initial_sync": "none"})],
                    volumes={"data": size}, journal_size="64MiB", heartbeat_timeout=1.0)
    a, b = topo["a"], topo["b"]
    pa, pb = a.volume_path("db", "data"), b.volume_path("db", "data")
    for p in (pa, pb):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(pa, "wb") as f:
        block = random.Random(seed).randbytes(MiB)
        for _ in range(size // MiB):
            f.write(block[1:] + block[:1])
            block = block[7:] + block[:7]
    shutil.copyfile(pa, pb)
    old = os.path.join(root, "old.img")
    shutil.copyfile(pa, old)
    out = {}
    try:
        topo.start()
        wait_until(lambda: replicating(a), 60, "a -> b replicating")
        # 1. resync after an outage vs rsync of the same change
        b.stop()
        changed = regions(size, seed)
        cmds = []
        for r in changed:
            cmds += ["-c", f"write -P {r % 251 + 1} {r * GRAN} {GRAN}"]
        subprocess.run(["qemu-io", "-f", "raw", *cmds, a.nbd_uri("data")], check=True,
                       capture_output=True)
        wait_until(lambda: a.target("db", "b")["state"] == "logging" and
                   a.target("db", "b")["dirty_bytes"] >= len(changed) * GRAN, 30, "b logging")
        warm(pa, pb, old)
        start = time.monotonic()
        b.start(wait=False)
        wait_until(lambda: replicating(a), 120, "resync done")
        out["resync_wall_s"] = time.monotonic() - start  # includes starting the agent
        out["resync_s"] = resync_seconds(a)
        warm(pa, old)
        out["rsync_s"] = timed(RSYNC + [pa, old])
        subprocess.run(["cmp", pa, pb], check=True)
        # 2. checksum sync of a copy that differs in 1% of its regions
        b.stop()
        patch_file(pb, regions(size, seed + 1), seed)
        patch_file(old, regions(size, seed + 1), seed)
        b.start()
        warm(pa, pb, old)
        start = time.monotonic()
        rc, answer = replicator_cli(a, "resync", "db", "b", "--checksum")
        assert rc == 0, answer
        wait_until(lambda: a.target("db", "b")["resync"] is not None or replicating(a), 30)
        wait_until(lambda: replicating(a), 120, "checksum resync done")
        out["checksum_wall_s"] = time.monotonic() - start  # includes the CLI round trip
        out["checksum_s"] = resync_seconds(a)
        warm(pa, old)
        out["checksum_rsync_s"] = timed(RSYNC + [pa, old])
        subprocess.run(["cmp", pa, pb], check=True)
        # 3. online verify vs hashing both files (warm cache for everyone)
        warm(pa, pb)
        rc, v = replicator_cli(a, "verify", "db", "b")
        assert rc == 0 and not v["mismatches"], v
        out["verify_s"] = v["seconds"]
        warm(pa, pb)  # the agents drop what a pass read once it is done
        out["xxhsum_s"] = timed(["xxhsum", "-H64", pa, pb])
        out["sha256sum_s"] = timed(["sha256sum", pa, pb])
        out["regions_changed"] = len(changed)
    finally:
        topo.stop()
    return out


LINK_MBIT = 100


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def link_run(root: str, dirty: int, seed: int) -> dict:
    """Resync `dirty` bytes over a 100 Mbit/s tbf link between two namespaces."""
    tag = f"rbr{os.getpid() % 10000}"
    ns = {"a": f"{tag}a", "b": f"{tag}b"}
    ip = {"a": "10.214.0.1", "b": "10.214.0.2"}
    procs = []
    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{tag}va", "netns", ns["a"], "type", "veth", "peer", "name",
           f"{tag}vb", "netns", ns["b"])
        for n, dev in (("a", f"{tag}va"), ("b", f"{tag}vb")):
            sh("ip", "-n", ns[n], "addr", "add", f"{ip[n]}/24", "dev", dev)
            sh("ip", "-n", ns[n], "link", "set", dev, "up")
        sh("ip", "netns", "exec", ns["a"], "tc", "qdisc", "add", "dev", f"{tag}va", "root",
           "tbf", "rate", f"{LINK_MBIT}mbit", "burst", "64kb", "latency", "50ms")
        topo = Topology(root, ["a", "b"], [("a", "b", "async", {"initial_sync": "none"})],
                        volumes={"data": 4 * dirty}, heartbeat_timeout=5.0)
        for n in ("a", "b"):
            cfg = topo[n].config
            cfg["listen"] = f"{ip[n]}:7800"
            cfg["peers"] = {p: f"{ip[p]}:7800" for p in ("a", "b") if p != n}
            topo[n].save_config()

        def start(n):
            log = open(topo[n].log_path, "a")
            p = subprocess.Popen(["ip", "netns", "exec", ns[n], sys.executable, "-m",
                                  "replicator.cli", "agent", "-c", topo[n].config_path],
                                 stdout=log, stderr=log)
            log.close()
            procs.append(p)
            wait_until(lambda: admin_status(topo[n]), 20, f"agent {n}")
            return p

        def admin_status(agent):
            from replicator import admin
            return admin.request(agent.config["admin_socket"], "status", timeout=5)

        start("a")
        pb = start("b")
        a = topo["a"]
        wait_until(lambda: replicating(a), 60, "a -> b replicating")
        pb.terminate()
        pb.wait(20)
        subprocess.run(["ip", "netns", "exec", ns["a"], "qemu-io", "-f", "raw", "-c",
                        f"write -P 0x5a 0 {dirty}", a.nbd_uri("data")], check=True,
                       capture_output=True)
        wait_until(lambda: a.target("db", "b")["state"] == "logging", 30, "b logging")
        start("b")
        wait_until(lambda: replicating(a), 300, "resync over the link")
        seconds = resync_seconds(a)
        return {"link_resync_bytes": dirty, "link_resync_s": seconds,
                "link_mbit": dirty * 8 / seconds / 1e6}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--link-dirty", default="128M", help="bytes resynced over the tbf link")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    runs = []
    for n, root in each_run(args.runs, "bench-resync-"):
        runs.append(one_run(root, size, seed=n))
        shutil.rmtree(root)
        os.makedirs(root)
        runs[-1].update(link_run(root, parse_size(args.link_dirty, "--link-dirty"), n))
        run_line(n, runs[-1])
    med = medians(runs)
    gb = size / 1e9
    summary = {
        "size_bytes": size,
        "runs": runs,
        "median": med,
        "resync_speedup_vs_rsync": med["rsync_s"] / med["resync_s"],
        "resync_wall_speedup_vs_rsync": med["rsync_s"] / med["resync_wall_s"],
        "checksum_speedup_vs_rsync": med["checksum_rsync_s"] / med["checksum_s"],
        "verify_GBps": gb / med["verify_s"],
        "xxhsum_both_GBps": gb / med["xxhsum_s"],
        "sha256sum_both_GBps": gb / med["sha256sum_s"],
        "link_utilisation": med["link_mbit"] / LINK_MBIT,
    }
    save("resync", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
