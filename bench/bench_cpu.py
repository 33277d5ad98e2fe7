"""CPU per write: where the randwrite ratio of bench_core comes from (issue 2).

    .venv/bin/python -m bench.bench_cpu [--rounds 2] [--seconds 10]

The same fio job as bench_core (4 KiB randwrite, iodepth 16, nbd engine) against the
agent pair (primary `p` with one async target `t`) and against `qemu-nbd -f raw
--cache=writeback`, alternating. For each it reports IOPS, the CPU each server process
spent per write (user + system, children included, from /proc/<pid>/stat over the
middle of the run), split into user space and kernel, the same for fio (run with
--thread so its job is in its own process), and how much CPU the whole machine
spent per write (interrupts and kernel threads included).

The bound: 2 cores give 2,000,000 µs of CPU a second, so no server can exceed
2e6 / (µs per write the machine must spend) IOPS. `bound_iops_kernel_only` applies
that to what the agent setup spends outside the agents' user space (their kernel
time, fio, interrupts, kernel threads): the IOPS this design would reach even if
its Python took no time at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_core import QemuNbd, cpu_seconds, fio_command, settle_memory  # noqa: E402
from tests.agents import MiB, Topology  # noqa: E402


def machine_busy() -> tuple[int, int]:
    """(busy, elapsed) ticks of all CPUs: busy is user, nice, system, irq and softirq;
    idle, iowait and steal (another guest's time) are not ours."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:9]]
    busy = t[0] + t[1] + t[2] + t[5] + t[6]
    return busy, busy + t[3] + t[4] + t[7]


def measure(uri: str, pids: dict[str, int], seconds: int) -> dict:
    settle_memory()
    fio = subprocess.Popen(fio_command(uri, iodepth=16, seconds=seconds, size="256M",
                                       extra=("--thread",)),
                           stdout=subprocess.PIPE, text=True)
    pids = {**pids, "fio": fio.pid}
    time.sleep(1)  # past connection set-up
    c0 = {n: cpu_seconds(p) for n, p in pids.items()}
    b0, t0 = machine_busy(), time.monotonic()
    time.sleep(seconds - 2)
    c1 = {n: cpu_seconds(p) for n, p in pids.items()}
    b1, elapsed = machine_busy(), time.monotonic() - t0
    out = fio.communicate()[0]
    iops = json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]
    writes = iops * elapsed
    per_write = {n: {"user": round((c1[n][0] - c0[n][0]) / writes * 1e6, 1),
                     "system": round((c1[n][1] - c0[n][1]) / writes * 1e6, 1)} for n in pids}
    busy = (b1[0] - b0[0]) / (b1[1] - b0[1])
    machine_us = busy * os.cpu_count() * elapsed / writes * 1e6
    servers_user = sum(v["user"] for n, v in per_write.items() if n != "fio")
    return {"iops": round(iops), "cpu_us_per_write": per_write,
            "machine_busy_pct": round(busy * 100), "machine_us_per_write": round(machine_us, 1),
            "bound_iops_kernel_only": round(os.cpu_count() * 1e6 / (machine_us - servers_user))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="replicator-bench-cpu-", dir="/var/tmp")
    topo = q = None
    try:
        topo = Topology(os.path.join(work, "pair"), ["p", "t"], [("p", "t", "async")],
                        volumes={"data": 256 * MiB}, journal_size="1GiB").start()
        q = QemuNbd(os.path.join(work, "qemu.img"), 256 * MiB)
        for _ in range(args.rounds):
            topo.wait_converged(300)
            agent = measure(topo["p"].nbd_uri("data"), {n: topo[n].proc.pid for n in "pt"},
                            args.seconds)
            topo.wait_converged(300)
            ref = measure(q.uri, {"qemu-nbd": q.proc.pid}, args.seconds)
            print(json.dumps({"agent": agent, "qemu_nbd": ref}), flush=True)
    finally:
        if q is not None:
            q.stop()
        if topo is not None:
            topo.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
