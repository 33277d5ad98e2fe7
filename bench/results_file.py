"""What every benchmark does with its runs: one line per run as it ends, the medians,
and the summary printed and written to bench/results/<name>.json."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def each_run(runs: int, prefix: str):
    """1..runs, each with a fresh directory under /var/tmp that goes once the run ends."""
    for n in range(1, runs + 1):
        root = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
        try:
            yield n, root
        finally:
            shutil.rmtree(root, ignore_errors=True)


def run_line(n: int, out: dict) -> None:
    print(f"run {n}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in out.items()), flush=True)


def medians(runs: list[dict]) -> dict:
    """The median of every number all runs have."""
    keys = [k for k, v in runs[0].items()
            if isinstance(v, (int, float)) and all(k in r for r in runs)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def save(name: str, summary: dict) -> None:
    """Print the summary (without its per-run figures) and write all of it."""
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
