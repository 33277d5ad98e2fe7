"""The index of scheduled DR exercise runs: every run's verdict and the trend of RPO and
RTO over runs, on one page.

The scheduled runner (roles/replicator_dr_schedule) makes one directory per run in a base
directory, named by the run's UTC start time (`20261202T030000Z`), with the playbook's
`ansible.log`; the DR exercise writes `GROUP/report.json` (and .xml, .md, .html) in it for
each group it drilled. `write_index(base, keep)`:

1. deletes the oldest runs beyond `keep`. A run is a directory (not a symbolic link)
   whose name is such a time; nothing else in the base directory is ever deleted;
2. reads one row per run and group from each `report.json` (`result`,
   `rpo_writes_lost`, `takeover.rpo_records`, `rpo_seconds`, `rto_seconds`). A report
   that cannot be read or is not a report is the row's result `unreadable` (with why),
   and a run that has no group directory, or a group without report.json, gives
   `no report` (the playbook failed before the drill: see the run's ansible.log);
   whatever a report holds, the index is still written;
3. writes `index.json` (the rows, oldest first, and the runs it deleted) and
   `index.html`: the trend of RTO and RPO in seconds as inline SVG charts (no script), and
   the rows newest first, each linked to its report.html and its run's ansible.log.

`replicator drill index --dir BASE [--keep N] [--json]` does it from the command line:
exit 0, or 1 on an error (a base directory that is not one, a keep below 1).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shutil
import sys
import urllib.parse
from datetime import datetime, timezone

from replicator.drill import report as drill_report

RUN_NAME = re.compile(r"\d{8}T\d{6}Z")
RUN_TIME = "%Y%m%dT%H%M%SZ"
DEFAULT_KEEP = 12
PASS, FAIL, UNREADABLE, NO_REPORT = "pass", "fail", "unreadable", "no report"
RESULTS = (PASS, FAIL)


def runs(base: str) -> list[str]:
    """The names of the run directories in BASE, oldest first."""
    found = []
    with os.scandir(base) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and _run_time(entry.name) is not None:
                found.append(entry.name)
    return sorted(found)


def _run_time(name: str) -> datetime | None:
    if not RUN_NAME.fullmatch(name):
        return None
    try:
        return datetime.strptime(name, RUN_TIME).replace(tzinfo=timezone.utc)
    except ValueError:  # 20261399T...: looks like a run, is no time
        return None


def prune(base: str, keep: int) -> list[str]:
    """Delete the oldest runs of BASE beyond KEEP; return the names deleted."""
    if keep < 1:
        raise ValueError(f"keep {keep}: at least the newest run must be kept")
    old = runs(base)[:-keep]
    for name in old:
        shutil.rmtree(os.path.join(base, name))
    return old


def run_rows(base: str, name: str) -> list[dict]:
    """One row per group drilled in run NAME of BASE (one `no report` row if none)."""
    run_dir = os.path.join(base, name)
    log = f"{name}/ansible.log" if os.path.isfile(os.path.join(run_dir, "ansible.log")) else None
    with os.scandir(run_dir) as entries:
        groups = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    rows = [_row(run_dir, name, group) for group in groups] or [
        _blank_row(NO_REPORT, group=None, error="no group was drilled")]
    for row in rows:
        row.update(run=name, time=_iso(_run_time(name)), log=log)
    return rows


def _blank_row(result: str, group: str | None, error: str | None = None) -> dict:
    return {"group": group, "result": result, "rpo_writes_lost": None, "rpo_records": None,
            "rpo_seconds": None, "rto_seconds": None, "report": None, "error": error}


def _row(run_dir: str, name: str, group: str) -> dict:
    row = _read_report(os.path.join(run_dir, group, "report.json"), group)
    for page in ("report.html", "report.md", "report.json"):  # what a person reads first
        if os.path.isfile(os.path.join(run_dir, group, page)):
            row["report"] = f"{name}/{group}/{page}"
            break
    return row


def _read_report(path: str, group: str) -> dict:
    if not os.path.exists(path):
        return _blank_row(NO_REPORT, group, "no report.json")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return _blank_row(UNREADABLE, group, f"report.json: {exc}")
    if not isinstance(report, dict) or report.get("result") not in RESULTS:
        what = (f"result {report.get('result')!r}" if isinstance(report, dict)
                else f"a JSON {type(report).__name__}")
        return _blank_row(UNREADABLE, group, f"report.json is not a drill report ({what})")
    takeover = report.get("takeover")
    row = _blank_row(report["result"], group)
    row.update(rpo_writes_lost=_count(report.get("rpo_writes_lost")),
               rpo_records=_count(takeover.get("rpo_records")) if isinstance(takeover, dict)
               else None,
               rpo_seconds=_seconds(report.get("rpo_seconds")),
               rto_seconds=_seconds(report.get("rto_seconds")))
    return row


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _seconds(value) -> float | None:
    """A measure in seconds as a finite float; anything else (NaN, text, 1e400) is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_index(base: str, keep: int = DEFAULT_KEEP) -> dict:
    """Prune BASE to KEEP runs, then write BASE/index.json and BASE/index.html; return
    what index.json holds."""
    if not os.path.isdir(base):
        raise ValueError(f"{base} is not a directory")
    removed = prune(base, keep)
    rows = [row for name in runs(base) for row in run_rows(base, name)]
    index = {"generated_at": _iso(datetime.now(timezone.utc)), "keep": keep,
             "removed": removed, "rows": rows}
    drill_report.write_text(os.path.join(base, "index.json"), json.dumps(index, indent=2) + "\n")
    drill_report.write_text(os.path.join(base, "index.html"), index_html(index))
    return index


# --- index.html ------------------------------------------------------------------

def index_html(index: dict) -> str:
    e = html.escape
    rows = index["rows"]
    names = sorted({row["run"] for row in rows})
    body = ["<h1>DR exercise runs</h1>",
            f"<p>{len(names)} run(s) kept (at most {index['keep']}); "
            f"index generated {e(index['generated_at'])}</p>"]
    if rows:
        last = [row for row in rows if row["run"] == names[-1]]
        verdict = PASS if all(row["result"] == PASS for row in last) else FAIL
        body.append(f'<p>Last run {e(last[0]["time"])}: '
                    f'<span class="{verdict}">{verdict.upper()}</span></p>')
        body += ["<h2>RTO: declared failure to writable (seconds)</h2>",
                 trend_svg(rows, names, "rto_seconds", "RTO"),
                 "<h2>RPO: seconds of acknowledged (flushed) writes lost</h2>",
                 trend_svg(rows, names, "rpo_seconds", "RPO")]
    table = []
    for row in reversed(rows):
        links = []
        if row["report"]:
            links.append(_link(row["report"], "report"))
        if row["log"]:
            links.append(_link(row["log"], "ansible.log"))
        result = (e(row["result"]) + (f": {e(row['error'])}" if row["error"] else ""),
                  row["result"].replace(" ", ""))
        table.append([e(row["time"]), e(row["group"] or "-"), result,
                      (_number(row["rpo_writes_lost"]), "num"), (_number(row["rpo_records"]), "num"),
                      (_number(row["rpo_seconds"], "%.3f"), "num"),
                      (_number(row["rto_seconds"], "%.1f"), "num"), " ".join(links)])
    body += ["<h2>Runs</h2>",
             drill_report.html_table(["Run (UTC)", "Group", "Result", "RPO writes lost",
                                      "RPO records", "RPO seconds", "RTO seconds", "Files"],
                                     table)]
    if index["removed"]:
        body.append(f"<p>Deleted by this index (beyond {index['keep']}): "
                    f"{e(', '.join(index['removed']))}</p>")
    return drill_report.html_document("DR exercise runs", body)


def _link(path: str, text: str) -> str:
    return f'<a href="{html.escape(urllib.parse.quote(path))}">{html.escape(text)}</a>'


def _number(value, form: str = "%d") -> str:
    return "-" if value is None else form % value


# The chart: one line per group through its runs' measures, a dot per run coloured by
# its result (a tooltip says which run and how much), the y axis from 0 to the largest.
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 720, 220, 56, 150, 12, 40
PALETTE = ("#1f5fa8", "#c26a00", "#6a3d9a", "#00847e", "#8c564b", "#b8008a")
DOT = {PASS: "#176b2c", FAIL: "#b3261e"}


def trend_svg(rows: list[dict], names: list[str], measure: str, label: str) -> str:
    """An inline SVG chart of MEASURE over the runs NAMES (oldest first), a line per group."""
    e = html.escape
    values = [row[measure] for row in rows if row[measure] is not None]
    top = max(values, default=0.0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(run: str) -> float:
        n = names.index(run)
        return LEFT + (plot_w / 2 if len(names) == 1 else plot_w * n / (len(names) - 1))

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{e(label)} over runs">']
    for fraction in (0, 0.5, 1):
        level = y(top * fraction)
        out.append(f'<line x1="{LEFT}" y1="{level:.1f}" x2="{LEFT + plot_w}" y2="{level:.1f}" '
                   f'stroke="#d5d9de"/>')
        out.append(f'<text x="{LEFT - 6}" y="{level + 4:.1f}" text-anchor="end">'
                   f"{top * fraction:.3g}</text>")
    # every run's time under its dot while they fit (about 110 px each), else the ends'
    shown = set(names) if plot_w / max(len(names) - 1, 1) >= 110 else {names[0], names[-1]}
    for run in sorted(shown):
        out.append(f'<text x="{x(run):.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">'
                   f"{e(_iso(_run_time(run))[:16].replace('T', ' '))}</text>")
    if not values:
        out.append(f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle">'
                   "not measured in any run</text>")
    groups = sorted({row["group"] for row in rows if row[measure] is not None})
    for n, group in enumerate(groups):
        colour = PALETTE[n % len(PALETTE)]
        points = [(x(row["run"]), y(row[measure]), row) for row in rows
                  if row["group"] == group and row[measure] is not None]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                   + " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points) + '"/>')
        for px, py, row in points:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{DOT[row["result"]]}">'
                       f'<title>{e(row["time"])} {e(group)}: {row[measure]:.3f} s '
                       f'({e(row["result"])})</title></circle>')
        legend_y = TOP + 14 + 18 * n
        out.append(f'<line x1="{WIDTH - RIGHT + 16}" y1="{legend_y - 4}" '
                   f'x2="{WIDTH - RIGHT + 36}" y2="{legend_y - 4}" stroke="{colour}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{WIDTH - RIGHT + 42}" y="{legend_y}">{e(group)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="replicator drill index",
        description="Keep the newest N scheduled DR exercise runs of a base directory (one "
                    "directory per run, named by its UTC start time, e.g. 20261202T030000Z) "
                    "and write its index.html and index.json: each run's verdict per group "
                    "and the trend of RPO and RTO. Exit 0, or 1 on an error.")
    parser.add_argument("--dir", required=True, help="the base directory of the runs")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP,
                        help=f"runs to keep, newest first (default {DEFAULT_KEEP})")
    parser.add_argument("--json", action="store_true", help="print index.json's content")
    args = parser.parse_args(argv)
    try:
        index = write_index(args.dir, args.keep)
    except (OSError, ValueError) as exc:
        print(f"index: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(index))
    else:
        print(f"{len({row['run'] for row in index['rows']})} run(s) in "
              f"{os.path.join(args.dir, 'index.html')}"
              + (f"; deleted {', '.join(index['removed'])}" if index["removed"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
