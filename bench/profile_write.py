"""Profile of the write path: where the primary agent spends its time per write.

    .venv/bin/python -m bench.profile_write [--seconds 10] [--mode async] [--iodepth 16]

Starts the benchmark pair (bench_core.agent_pair: primary `p`, target `t` on loopback),
runs the fio 4 KiB random-write job against the primary twice: once under py-spy
(sampling the primary's Python stacks, `--native` off, 250 Hz) and once under
`strace -c -f` (syscall counts). Prints, per write, the syscalls of the primary and the
functions with the most samples (own and inclusive), and writes the collapsed stacks to
bench/results/profile-<mode>.txt (flamegraph input). Needs py-spy (pip) and strace.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_core import MiB, agent_pair, fio  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _py_spy(pid: int, seconds: int, out: str) -> subprocess.Popen:
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250",
                             "--duration", str(seconds), "--format", "raw", "--output", out,
                             "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _strace(pid: int, out: str) -> subprocess.Popen:
    return subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _summarize_stacks(path: str, top: int) -> tuple[int, list, list]:
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue  # a blank or partial line
            n = int(count)
            frames = [re.sub(r" \(.*/replicator/", " (", fr) for fr in stack.split(";")]
            total += n
            own[frames[-1]] += n
            for fr in set(frames):
                inclusive[fr] += n
    return total, own.most_common(top), inclusive.most_common(top)


def _syscalls(path: str) -> list[tuple[str, int]]:
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls = int(parts[3])
                rows.append((parts[-1], calls))
    return sorted(rows, key=lambda r: -r[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--mode", default="async", choices=("async", "sync"))
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    root = tempfile.mkdtemp(prefix="profile-", dir="/var/tmp")
    with agent_pair(root, args.mode, vol_size=1024 * MiB, journal_size="1GiB") as topo:
        p = topo["p"]
        uri = p.nbd_uri("g0v0")
        stacks = os.path.join(RESULTS, f"profile-{args.mode}.txt")
        spy = _py_spy(p.proc.pid, args.seconds, stacks)
        run = fio(uri, iodepth=args.iodepth, seconds=args.seconds, size="1G")
        spy.wait(60)
        with tempfile.NamedTemporaryFile(suffix=".strace") as tf:
            tracer = _strace(p.proc.pid, tf.name)
            traced = fio(uri, iodepth=args.iodepth, seconds=args.seconds, size="1G")
            tracer.terminate()
            tracer.wait(30)
            calls = _syscalls(tf.name)
    print(f"fio {args.mode} QD{args.iodepth}: {run['iops']:.0f} IOPS under py-spy, "
          f"{traced['iops']:.0f} under strace ({traced['writes']} writes traced)")
    print("\nsyscalls of the primary per write (strace -c -f):")
    for name, n in calls[:15]:
        print(f"  {name:<20} {n / traced['writes']:.3f}")
    total, own, inclusive = _summarize_stacks(stacks, args.top)
    print(f"\npy-spy: {total} samples; own time:")
    for frame, n in own:
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print("\ninclusive:")
    for frame, n in inclusive:
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print(f"\ncollapsed stacks: {stacks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
