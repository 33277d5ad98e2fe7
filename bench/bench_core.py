"""Replication core benchmarks, side by side with qemu-nbd in one run (issue 2).

    .venv/bin/python -m bench.bench_core [--runs 3] [--seconds 20] [--copy-size 1G]

1. fio --ioengine=nbd 4 KiB random write, iodepth 16: the agent (group with one async
   target, a second agent on loopback) vs `qemu-nbd -f raw --cache=writeback` on a file.
2. nbdcopy of a 1 GiB random file into the replicated export vs into qemu-nbd, with
   the bytes the disk took during each copy (the pair journals and applies every byte
   on both nodes, all on this one disk), and into qemu-nbd once more with --flush
   (plain nbdcopy leaves qemu-nbd's copy in the page cache; the agent acknowledges
   each write once it is durable in the journal).
3. sync mode, iodepth 1: fio write latency p50/p99 vs the floor measured in the same
   run (local 4 KiB write+fdatasync, loopback round trip, remote 4 KiB write+fdatasync).
4. peak RSS (VmHWM) of the agents.
Runs alternate between the two servers, each measurement starting on a pair that has
caught up (no initial sync or backlog running), after `sync` and `drop_caches` (root
only); the medians and their ratio are printed and
written to bench/results/core.json. Everything runs under a temporary directory on the
same file system as the state dirs would be.
"""

from __future__ import annotations

import argparse
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


def settle_memory() -> None:
    """Each measurement starts from the same memory and disk state: nothing dirty left
    by the step before (sync), nothing it cached (drop_caches). On this VM, a page
    cache left large by the previous step halved qemu-nbd's copy speed."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def fio_command(uri: str, *, iodepth: int, seconds: int, size: str, rw="randwrite") -> list:
    """The 4 KiB fio job over NBD every benchmark of the write path runs (JSON output)."""
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--iodepth={iodepth}", f"--size={size}", f"--runtime={seconds}", "--time_based",
            "--output-format=json"]


def fio_json(uri: str, *, iodepth: int, seconds: int, size: str, rw="randwrite") -> dict:
    settle_memory()
    out = subprocess.run(fio_command(uri, iodepth=iodepth, seconds=seconds, size=size, rw=rw),
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return {"iops": job["iops"], "p50_us": job["clat_ns"]["percentile"]["50.000000"] / 1000,
            "p99_us": job["clat_ns"]["percentile"]["99.000000"] / 1000}


class QemuNbd:
    def __init__(self, path: str, size: int):
        with open(path, "wb") as f:
            f.truncate(size)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "--cache=writeback", "-t", "-e", "8", "-b", "127.0.0.1",
             "-p", str(self.port), "-x", "data", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True,
                   10, "qemu-nbd to listen")
        self.uri = f"nbd://127.0.0.1:{self.port}/data"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


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


def latency_floor(directory: str, n: int = 2000) -> dict:
    """Local 4 KiB write+fdatasync, then a loopback round trip to a peer that does its
    own 4 KiB write+fdatasync before answering: what a sync write cannot beat."""
    block = os.urandom(4096)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def peer():
        conn, _ = srv.accept()
        fd = os.open(os.path.join(directory, "floor-remote"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        while True:
            data = b""
            while len(data) < 4096:
                chunk = conn.recv(4096 - len(data))
                if not chunk:
                    os.close(fd)
                    conn.close()
                    return
                data += chunk
            os.write(fd, data)
            os.fdatasync(fd)
            conn.sendall(b"k")

    th = threading.Thread(target=peer, daemon=True)
    th.start()
    cli = socket.create_connection(("127.0.0.1", port))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = os.open(os.path.join(directory, "floor-local"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        os.write(fd, block)
        os.fdatasync(fd)
        cli.sendall(block)
        cli.recv(1)
        samples.append((time.perf_counter() - t) * 1e6)
    cli.close()
    os.close(fd)
    th.join(5)
    srv.close()
    samples.sort()
    return {"p50_us": samples[len(samples) // 2], "p99_us": samples[int(len(samples) * 0.99)]}


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--copy-size", default="1G")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir under /var/tmp)")
    args = ap.parse_args()
    copy_bytes = int(args.copy_size[:-1]) << {"M": 20, "G": 30}[args.copy_size[-1]]
    work = tempfile.mkdtemp(prefix="replicator-bench-", dir=args.dir or "/var/tmp")
    results: dict = {"runs": args.runs, "seconds": args.seconds, "copy_bytes": copy_bytes,
                     "randwrite": [], "copy": [], "sync_latency": [], "floor": []}
    vol_size = max(copy_bytes, 256 * MiB)
    topo = None
    try:
        src = os.path.join(work, "source.img")
        with open(src, "wb") as f:
            for _ in range(copy_bytes // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        for run in range(args.runs):
            # --- async target: randwrite and copy --------------------------------------
            topo = Topology(os.path.join(work, f"async{run}"), ["p", "t"], [("p", "t", "async")],
                            volumes={"data": vol_size}, journal_size="1GiB").start()
            q = QemuNbd(os.path.join(work, f"qemu{run}.img"), vol_size)
            try:
                # Every step starts on an idle pair: no initial sync, and no backlog of the
                # step before still being shipped (not even under qemu-nbd's run).
                topo.wait_converged(300)
                agent = fio_json(topo["p"].nbd_uri("data"), iodepth=16, seconds=args.seconds,
                                 size="256M")
                topo.wait_converged(300)
                ref = fio_json(q.uri, iodepth=16, seconds=args.seconds, size="256M")
                results["randwrite"].append({"agent": agent["iops"], "qemu_nbd": ref["iops"]})
                agent_copy, agent_disk = nbdcopy(src, topo["p"].nbd_uri("data"))
                topo.wait_converged(300)
                ref_copy, ref_disk = nbdcopy(src, q.uri)
                # The agent acknowledges a write once its journal made it durable; plain
                # nbdcopy into qemu-nbd leaves it in the page cache: also time it with
                # --flush (durable when nbdcopy exits).
                flush_copy, flush_disk = nbdcopy(src, q.uri, "--flush")
                results["copy"].append({"agent": agent_copy, "qemu_nbd": ref_copy,
                                        "qemu_nbd_flush": flush_copy,
                                        "disk_bytes": {"agent": agent_disk, "qemu_nbd": ref_disk,
                                                       "qemu_nbd_flush": flush_disk}})
                results.setdefault("peak_rss_kib", []).append(
                    {n: peak_rss_kib(topo[n].proc.pid) for n in ("p", "t")})
            finally:
                q.stop()
                topo.stop()
                shutil.rmtree(topo.root, ignore_errors=True)
            # --- sync target: latency at iodepth 1 vs the floor ------------------------
            topo = Topology(os.path.join(work, f"sync{run}"), ["p", "t"], [("p", "t", "sync")],
                            volumes={"data": 256 * MiB}, journal_size="256MiB").start()
            try:
                wait_until(lambda: topo["p"].target("db", "t")["in_sync"], 30, "sync target in sync")
                results["sync_latency"].append(fio_json(topo["p"].nbd_uri("data"), iodepth=1,
                                                        seconds=max(5, args.seconds // 2),
                                                        size="64M"))
                results["floor"].append(latency_floor(topo.root))
                results.setdefault("peak_rss_kib", []).append(
                    {n: peak_rss_kib(topo[n].proc.pid) for n in ("p", "t")})
            finally:
                topo.stop()
                shutil.rmtree(topo.root, ignore_errors=True)
            print(f"run {run + 1}/{args.runs}: randwrite {results['randwrite'][-1]}, "
                  f"copy {results['copy'][-1]}, sync {results['sync_latency'][-1]}, "
                  f"floor {results['floor'][-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    rw_a = med(r["agent"] for r in results["randwrite"])
    rw_q = med(r["qemu_nbd"] for r in results["randwrite"])
    cp_a = med(r["agent"] for r in results["copy"])
    cp_q = med(r["qemu_nbd"] for r in results["copy"])
    cp_f = med(r["qemu_nbd_flush"] for r in results["copy"])
    lat50 = med(r["p50_us"] for r in results["sync_latency"])
    lat99 = med(r["p99_us"] for r in results["sync_latency"])
    fl50 = med(r["p50_us"] for r in results["floor"])
    fl99 = med(r["p99_us"] for r in results["floor"])
    rss = max(max(d.values()) for d in results["peak_rss_kib"])
    summary = {
        "randwrite_iops": {"agent": round(rw_a), "qemu_nbd": round(rw_q), "ratio": round(rw_a / rw_q, 2)},
        "copy_MBps": {"agent": round(copy_bytes / cp_a / 1e6), "qemu_nbd": round(copy_bytes / cp_q / 1e6),
                      "ratio": round(cp_q / cp_a, 2),
                      "qemu_nbd_flush": round(copy_bytes / cp_f / 1e6),
                      "ratio_to_flush": round(cp_f / cp_a, 2)},
        # what reached the disk while the copy ran, per byte copied (journals, volumes)
        "copy_disk_bytes_per_byte": {
            side: round(med(r["disk_bytes"][side] for r in results["copy"]) / copy_bytes, 2)
            for side in ("agent", "qemu_nbd", "qemu_nbd_flush") if results["copy"][0]["disk_bytes"][side] is not None},
        "sync_latency_us": {"p50": round(lat50), "p99": round(lat99), "floor_p50": round(fl50),
                            "floor_p99": round(fl99), "p50_over_floor": round(lat50 / fl50, 2)},
        "agent_peak_rss_MiB": round(rss / 1024, 1),
    }
    results["summary"] = summary
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "core.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
