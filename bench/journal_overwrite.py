"""Why journal segments are not reused in place (BENCHMARKS.md, "Journal segments
reused in place"): the two costs that decide it, on this machine's file system.

    .venv/bin/python -m bench.journal_overwrite [--dir /var/tmp] [--rounds 2]

1. fdatasync p50 after a 16 KiB write: appended to a new segment (blocks allocated
   with fallocate KEEP_SIZE, as segments.py makes them), overwriting blocks written
   before (a reused segment of zeroes), and into allocated but unwritten blocks
   (what FALLOC_FL_ZERO_RANGE would leave).
2. The write itself, record-sized (4 KiB + a 47-byte header, so pages are written in
   part), each followed by fdatasync, after the page cache dropped the file: appended,
   against overwriting a file of zeroes (the kernel reads each partly written page first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from replicator import fallocate as falloc

SEGMENT = 64 << 20


def _file(directory: str, name: str, prepare: str) -> tuple[str, int]:
    path = os.path.join(directory, f"journal-overwrite-{name}")
    if os.path.exists(path):
        os.unlink(path)
    flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if prepare == "append" else 0)
    fd = os.open(path, flags, 0o600)
    if prepare == "append":
        falloc.fallocate(fd, falloc.KEEP_SIZE, 0, SEGMENT, path)
    elif prepare == "zeroes":
        zeroes = bytes(1 << 20)
        for _ in range(SEGMENT >> 20):
            os.write(fd, zeroes)
    else:  # unwritten
        os.posix_fallocate(fd, 0, SEGMENT)
    os.fsync(fd)
    return path, fd


def _run(directory: str, prepare: str, size: int, n: int, *, evict: bool, time_sync: bool):
    path, fd = _file(directory, prepare, prepare)
    if evict:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    data, pos, samples = os.urandom(size), 0, []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            if prepare == "append":
                os.write(fd, data)
            else:
                os.pwrite(fd, data, pos)
            t1 = time.perf_counter()
            os.fdatasync(fd)
            samples.append(((time.perf_counter() - t1) if time_sync else (t1 - t0)) * 1e6)
            pos += size
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for r in range(1, args.rounds + 1):
        sync = {p: _run(args.dir, p, 16 << 10, 1500, evict=False, time_sync=True)
                for p in ("append", "zeroes", "unwritten")}
        write = {p: _run(args.dir, p, 4096 + 47, 800, evict=True, time_sync=False)
                 for p in ("append", "zeroes")}
        print(f"round {r}: fdatasync p50 after 16 KiB: appended {sync['append']:.0f} µs, "
              f"over written blocks {sync['zeroes']:.0f} µs, into unwritten blocks "
              f"{sync['unwritten']:.0f} µs; record write p50 after eviction: appended "
              f"{write['append']:.0f} µs, over zeroes {write['zeroes']:.0f} µs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
