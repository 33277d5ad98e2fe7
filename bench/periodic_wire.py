"""Wire bytes of a periodic link vs an async one (issue 16): one primary, both targets,
one overwrite-heavy fio run.

    .venv/bin/python -m bench.periodic_wire [--runs 3] [--interval 30] [--passes 12]

Per run, a fresh topology on loopback: primary `p` with a 1 GiB volume and a 4 GiB
journal (the interval's 815 MB stay below half of its logging_high_water, past which an
epoch goes early), targets `asy`
(async) and `per` (periodic, `interval` seconds), both `initial_sync: assume-clean` (all three
volumes start as the same zeroes), compression off. Right after one of `per`'s epochs
has gone, one fio run (`--ioengine=nbd --rw=randwrite --bs=4k --iodepth=16`) writes
`passes` times over the first 64 MiB of the volume (`--size=64M --io_size=passes*64M`:
fio's random map writes every block once per pass, so each block is overwritten
exactly `passes` times); it must end before `per`'s next epoch, so that all of it falls
into one interval (said per run: `in_one_interval`). Then both targets catch up (the
next epoch for `per`), their volumes are compared with the primary's, and the bytes
each was sent during the run (`bytes_sent`: the records of every RECORDS frame, headers
included, before compression) are compared.
Medians of the runs go to stdout and bench/results/periodic_wire.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.results_file import each_run, medians, run_line, save  # noqa: E402
from tests.agents import MiB, Topology, wait_until  # noqa: E402
from tests.clients import run  # noqa: E402

HOT = 64 * MiB
BLOCK = 4096


def one_run(root: str, interval: float, passes: int) -> dict:
    topo = Topology(root, ["p", "asy", "per"],
                    [("p", "asy", "async", {"initial_sync": "assume-clean"}),
                     ("p", "per", "periodic", {"initial_sync": "assume-clean", "interval": interval})],
                    volumes={"data": 1024 * MiB}, journal_size="4GiB")
    p = topo["p"]
    try:
        topo.start()
        topo.wait_converged(60)
        base = {n: p.target("db", n)["bytes_sent"] for n in ("asy", "per")}
        # Just after an epoch of `per` (its next_due moves on by an interval):
        due = p.target("db", "per")["next_due"]
        wait_until(lambda: p.target("db", "per")["next_due"] > due + interval / 2,
                   interval + 10, "an epoch of per to go")
        started = time.time()
        next_due = p.target("db", "per")["next_due"]
        report = run(["fio", "--name=hot", "--ioengine=nbd", f"--uri={p.nbd_uri('data')}",
                      "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={HOT}",
                      f"--io_size={passes * HOT}", "--output-format=json"], timeout=600)
        out = json.loads(report[report.index("{"):])  # after fio's notes, if any
        ended = time.time()
        seq = topo.wait_converged(interval + 120)
        topo.assert_identical()
        sent = {n: p.target("db", n)["bytes_sent"] - base[n] for n in ("asy", "per")}
        epoch = p.target("db", "per")["last_epoch"]
        job = out["jobs"][0]["write"]
        return {"fio_seconds": ended - started, "fio_iops": job["iops"],
                "writes": job["total_ios"], "overwrites_per_block": job["total_ios"] * BLOCK / HOT,
                "in_one_interval": ended < next_due, "seq": seq,
                "async_bytes": sent["asy"], "periodic_bytes": sent["per"],
                "ratio": sent["asy"] / sent["per"],
                "epoch_records": epoch["records"], "epoch_bytes_before": epoch["bytes_before"],
                "epoch_bytes_after": epoch["bytes_after"]}
    finally:
        topo.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--interval", type=float, default=30.0)
    ap.add_argument("--passes", type=int, default=12)
    args = ap.parse_args()
    runs = []
    for n, root in each_run(args.runs, "bench-periodic-"):
        out = one_run(root, args.interval, args.passes)
        runs.append(out)
        run_line(n, out)
    med = medians(runs)
    save("periodic_wire", {"interval": args.interval, "passes": args.passes, "runs": runs,
                           "median": med, "every_run_in_one_interval":
                           all(r["in_one_interval"] for r in runs)})
    print(f"periodic ({args.interval:g} s) sent {med['ratio']:.2f}x fewer bytes than async "
          f"(median of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
