"""Marker round trip (issue 19): how long `mark` takes to return once the marker is
journaled and durable with every write before it, on a primary shipping to an async
target on loopback, idle and under a running fio writer.

    .venv/bin/python -m bench.bench_marker [--runs 3] [--marks 200]

Each mark is one admin request (replicator/admin.py), timed from its send to its
answer: what `replicator mark` costs less the CLI's own start (~0.15 s of Python). The
agents' state dirs and volumes are under /var/tmp (a real file system: the marker's
FLUSH is an fdatasync there). Per run: p50 and p99 in ms, idle and under fio (4 KiB
random writes, iodepth 16, to the primary's export). Medians of the runs go to stdout
and bench/results/marker.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_file import each_run, medians, run_line, save  # noqa: E402
from replicator import admin  # noqa: E402
from tests.agents import MiB, Topology, wait_until  # noqa: E402


def marks(agent, n: int, prefix: str) -> list[float]:
    sock = agent.config["admin_socket"]
    out = []
    for i in range(n):
        start = time.perf_counter()
        admin.request(sock, "mark", group="db", name=f"{prefix}-{i}")
        out.append((time.perf_counter() - start) * 1000)
    return out


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1]


def one_run(root: str, n: int) -> dict:
    topo = Topology(root, ["a", "b"], [("a", "b", "async")], volumes={"data": 256 * MiB},
                    journal_size="256MiB")
    topo.start()
    try:
        topo.wait_converged(120)
        idle = marks(topo["a"], n, "idle")
        fio = subprocess.Popen(["fio", "--name=load", "--ioengine=nbd",
                                f"--uri={topo['a'].nbd_uri('data')}", "--rw=randwrite",
                                "--bs=4k", "--iodepth=16", "--size=256M", "--time_based",
                                "--runtime=600", "--output=/dev/null"])
        try:
            seq = topo["a"].group("db")["seq"]
            wait_until(lambda: topo["a"].group("db")["seq"] > seq + 1000, 30, "fio writing")
            loaded = marks(topo["a"], n, "load")
        finally:
            fio.terminate()
            fio.wait(30)
        return {"idle_p50_ms": pct(idle, 50), "idle_p99_ms": pct(idle, 99),
                "load_p50_ms": pct(loaded, 50), "load_p99_ms": pct(loaded, 99)}
    finally:
        topo.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--marks", type=int, default=200)
    args = ap.parse_args()
    runs = []
    for n, root in each_run(args.runs, "bench-marker-"):
        out = one_run(root, args.marks)
        run_line(n, out)
        runs.append(out)
    save("marker", {"marks_per_run": args.marks, "medians": medians(runs), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
