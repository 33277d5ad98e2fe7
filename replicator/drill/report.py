"""The DR drill report: what happened, what was measured, and whether it was good enough.

`write_report(directory, drill)` writes four files and returns their paths:

- `report.json`: the whole report, for automation (`result`, `rpo_writes_lost`,
  `rpo_seconds`, `rto_seconds`, `timeline`, `checks`, `reasons`, objectives, ...);
- `report.xml`: JUnit XML, one <testsuite> in a <testsuites> root, one <testcase> per
  check, with <failure> or <skipped>, so Jenkins, GitLab or AWX show the drill as tests;
- `report.md`: a human summary with the measures, the checks and the timeline as tables;
- `report.html`: the same summary as one self-contained page (no scripts, no external
  assets, every text escaped), for a browser or an archive of reports.

Each file is written to a temporary name and renamed, so a reader never sees half a
report. The input is a plain dict (the drill playbook assembles it from facts):

    name            drill name (default "dr-exercise"); group: the group drilled
    timeline        [{"event": "declared_failure", "time": <epoch seconds or ISO 8601,
                      naive means UTC>, "detail": "..."}, ...]; known events are
                    declared_failure, promoted, writable, verified, failed_back
    rpo_writes_lost the RPO in writes: acknowledged writes (covered by a completed FLUSH,
                    or FUA) missing on the promoted replica (the ledger check)
    rpo_seconds     the RPO in seconds (the ledger check's rpo_seconds; when absent,
                    taken from `ledger`): from the recovery point, the acknowledgement
                    up to which every acknowledged write is on the replica, to the last
                    acknowledgement the writer received; 0 when nothing is missing
    rto_seconds     declared failure -> writable; when absent, computed from the timeline
    failback_bytes_shipped, volume_size
                    what the failback resync sent, against the volume size
    objectives      max_rpo_writes (0), max_rto_seconds (none: not judged),
                    max_failback_fraction (none: not judged), failback (true: the drill
                    must end with a failed_back event)
    result, reasons the drill's own verdict and reasons (a step that failed); optional
    checks          further checks: [{"name", "passed": bool, "message"}]

Other keys are carried into report.json unchanged (for instance the ledger check).

Checks: "RPO within objective", "RTO within objective", "failback restored primary",
"failback shipped only changed regions", the caller's checks, and "drill completed"
(fails with the caller's reasons, or when the caller's result is "fail"). A check whose
measure is missing fails (an unmeasured RPO is not a good RPO); one without an
objective is skipped. The result is "pass" when no check failed.

`python -m replicator.drill.report --input drill.json --dir DIR [--json]` does the same
from a JSON file (or - for stdin) for a playbook: exit 0 pass, 3 fail, 1 bad input.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

from replicator import statefile

DEFAULT_OBJECTIVES = {"max_rpo_writes": 0, "max_rto_seconds": None,
                      "max_failback_fraction": None, "failback": True}
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


def build_report(drill: dict) -> dict:
    """The report as report.json holds it; raises ValueError on malformed input."""
    objectives = {**DEFAULT_OBJECTIVES, **(drill.get("objectives") or {})}
    unknown = set(objectives) - set(DEFAULT_OBJECTIVES)
    if unknown:
        raise ValueError(f"unknown objectives: {', '.join(sorted(unknown))}")
    timeline = _timeline(drill.get("timeline") or [])
    rpo = drill.get("rpo_writes_lost")
    rpo_seconds = drill.get("rpo_seconds")
    if rpo_seconds is None and isinstance(drill.get("ledger"), dict):
        rpo_seconds = drill["ledger"].get("rpo_seconds")
    rto = drill.get("rto_seconds")
    if rto is None:
        rto = _rto_from(timeline)
    shipped, size = drill.get("failback_bytes_shipped"), drill.get("volume_size")
    fraction = shipped / size if shipped is not None and size else None

    checks = [_rpo_check(rpo, rpo_seconds, objectives["max_rpo_writes"]),
              _rto_check(rto, objectives["max_rto_seconds"]),
              _failback_check(timeline, objectives["failback"]),
              _failback_size_check(shipped, size, fraction,
                                   objectives["max_failback_fraction"])]
    for extra in drill.get("checks") or []:
        if not isinstance(extra, dict) or not extra.get("name"):
            raise ValueError(f"a check needs a name: {extra!r}")
        checks.append(_check(extra["name"], PASSED if extra.get("passed") else FAILED,
                             extra.get("message", "")))
    caller_reasons = [str(r) for r in drill.get("reasons") or []]
    if caller_reasons or drill.get("result") == "fail":
        checks.append(_check("drill completed", FAILED,
                             "; ".join(caller_reasons) or "the drill reported failure"))
    else:
        checks.append(_check("drill completed", PASSED, "every step of the drill completed"))
    reasons = caller_reasons + [f"{c['name']}: {c['message']}" for c in checks
                                if c["status"] == FAILED and c["name"] != "drill completed"]

    report = {
        "name": drill.get("name") or "dr-exercise",
        "group": drill.get("group"),
        "result": "fail" if any(c["status"] == FAILED for c in checks) else "pass",
        "reasons": reasons,
        "rpo_writes_lost": rpo,
        "rpo_seconds": None if rpo_seconds is None else round(float(rpo_seconds), 3),
        "rto_seconds": None if rto is None else round(float(rto), 3),
        "failback_bytes_shipped": shipped,
        "volume_size": size,
        "failback_fraction": None if fraction is None else round(fraction, 6),
        "objectives": objectives,
        "checks": checks,
        "timeline": timeline,
        "started": timeline[0]["time"] if timeline else None,
        "finished": timeline[-1]["time"] if timeline else None,
        "duration_seconds": timeline[-1]["offset_seconds"] if timeline else 0.0,
        "generated_at": _iso(datetime.now(timezone.utc).timestamp()),
    }
    report.update({key: value for key, value in drill.items() if key not in report})
    return report


def write_report(directory: str, drill: dict) -> dict[str, str]:
    """Write report.json, report.xml, report.md and report.html into `directory` (created
    if needed); return {"json": path, "xml": path, "md": path, "html": path}."""
    return _write_files(directory, build_report(drill))


def _write_files(directory: str, report: dict) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    renderings = {"json": lambda r: json.dumps(r, indent=2) + "\n", "xml": junit_xml,
                  "md": markdown, "html": html_page}
    paths = {}
    for kind, render in renderings.items():
        paths[kind] = os.path.join(directory, f"report.{kind}")
        write_text(paths[kind], render(report))
    return paths


# --- checks ----------------------------------------------------------------------

def _check(name: str, status: str, message: str) -> dict:
    return {"name": name, "status": status, "message": message}


def _rpo_check(rpo, rpo_seconds, limit) -> dict:
    name = "RPO within objective"
    if rpo is None:
        return _check(name, FAILED, "RPO not measured (no ledger check)")
    lost = f"{rpo} acknowledged (flushed) writes lost" + (
        "" if rpo_seconds is None else f" ({float(rpo_seconds):.3f} s)")
    if limit is None:  # async, no bunker: the RPO is measured, not promised
        return _check(name, SKIPPED, f"{lost}; no objective")
    status = PASSED if rpo <= limit else FAILED
    return _check(name, status, f"{lost}; objective at most {limit}")


def _rto_check(rto, limit) -> dict:
    name = "RTO within objective"
    if limit is None:
        return _check(name, SKIPPED, "no RTO objective given"
                      + ("" if rto is None else f" (measured {rto:.1f} s)"))
    if rto is None:
        return _check(name, FAILED, "RTO not measured (no declared_failure and writable events)")
    status = PASSED if rto <= limit else FAILED
    return _check(name, status, f"writable {rto:.1f} s after the declared failure; "
                                f"objective at most {limit} s")


def _failback_check(timeline, required: bool) -> dict:
    name = "failback restored primary"
    if not required:
        return _check(name, SKIPPED, "the drill does not fail back")
    if any(e["event"] == "failed_back" for e in timeline):
        return _check(name, PASSED, "the original primary is primary again")
    return _check(name, FAILED, "no failed_back event: the original primary was not restored")


def _failback_size_check(shipped, size, fraction, limit) -> dict:
    name = "failback shipped only changed regions"
    if limit is None:
        return _check(name, SKIPPED, "no failback size objective given")
    if fraction is None:
        return _check(name, FAILED, "failback bytes shipped or volume size not measured")
    status = PASSED if fraction <= limit else FAILED
    return _check(name, status, f"{_bytes(shipped)} shipped for a {_bytes(size)} volume "
                                f"({fraction:.2%}); objective at most {limit:.2%}")


# --- timeline --------------------------------------------------------------------

def _timeline(events: list) -> list[dict]:
    out = []
    for n, event in enumerate(events):
        if not isinstance(event, dict) or not event.get("event") or "time" not in event:
            raise ValueError(f"timeline entry {n} needs an event name and a time: {event!r}")
        entry = {"event": str(event["event"]), "epoch": round(_epoch(event["time"]), 6)}
        if event.get("detail"):
            entry["detail"] = str(event["detail"])
        out.append(entry)
    out.sort(key=lambda e: e["epoch"])
    start = out[0]["epoch"] if out else 0.0
    for entry in out:
        entry["time"] = _iso(entry["epoch"])
        entry["offset_seconds"] = round(entry["epoch"] - start, 3)
    return out


def _epoch(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"time {value!r} is not ISO 8601") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    raise ValueError(f"time {value!r} is neither epoch seconds nor ISO 8601")


def _iso(epoch: float) -> str:
    when = datetime.fromtimestamp(epoch, timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rto_from(timeline: list[dict]):
    failure = next((e for e in timeline if e["event"] == "declared_failure"), None)
    if failure is None:
        return None
    writable = next((e for e in timeline
                     if e["event"] == "writable" and e["epoch"] >= failure["epoch"]), None)
    return None if writable is None else writable["epoch"] - failure["epoch"]


# --- renderings ------------------------------------------------------------------

def junit_xml(report: dict) -> str:
    checks = report["checks"]
    counts = {
        "tests": str(len(checks)),
        "failures": str(sum(c["status"] == FAILED for c in checks)),
        "errors": "0",
        "skipped": str(sum(c["status"] == SKIPPED for c in checks)),
        "time": f"{report['duration_seconds']:.3f}",
    }
    root = ET.Element("testsuites", {"name": report["name"], **counts})
    suite = ET.SubElement(root, "testsuite", {"name": report["name"], **counts})
    if report["started"]:
        suite.set("timestamp", report["started"].rstrip("Z"))
    props = ET.SubElement(suite, "properties")
    for key in ("result", "group", "rpo_writes_lost", "rpo_seconds", "rto_seconds",
                "failback_bytes_shipped", "volume_size", "failback_fraction"):
        ET.SubElement(props, "property", {"name": key, "value": _text(report[key])})
    for key, value in report["objectives"].items():
        ET.SubElement(props, "property", {"name": f"objective.{key}", "value": _text(value)})
    classname = "replicator.drill." + (report["group"] or report["name"])
    for c in checks:
        case = ET.SubElement(suite, "testcase", {"classname": classname, "name": c["name"],
                                                 "time": "0"})
        if c["status"] == FAILED:
            ET.SubElement(case, "failure", {"message": c["message"],
                                            "type": "DrillCheckFailed"}).text = c["message"]
        elif c["status"] == SKIPPED:
            ET.SubElement(case, "skipped", {"message": c["message"]})
    ET.SubElement(suite, "system-out").text = "\n".join(
        f"{e['time']}  +{e['offset_seconds']:.3f}s  {e['event']}"
        + (f"  {e['detail']}" if "detail" in e else "") for e in report["timeline"])
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _about(report: dict, quote: str = "") -> list[str]:
    """The report's subject and span, as phrases (group, times, generation); the group's
    name between QUOTEs."""
    about = [f"group {quote}{report['group']}{quote}"] if report["group"] else []
    if report["started"]:
        about.append(f"from {report['started']} to {report['finished']} "
                     f"({report['duration_seconds']:.1f} s)")
    about.append(f"report generated {report['generated_at']}")
    return about


def _measures(report: dict) -> list[tuple[str, str, str]]:
    """The measures as (measure, value, objective) rows, "-" where there is none."""
    obj = report["objectives"]
    rto, rpo_limit, rto_limit = (report["rto_seconds"], obj["max_rpo_writes"],
                                 obj["max_rto_seconds"])
    rows = [("RPO: acknowledged (flushed) writes lost", _text(report["rpo_writes_lost"], "-"),
             "-" if rpo_limit is None else f"at most {rpo_limit}"),
            ("RPO: seconds of acknowledged (flushed) writes lost",
             "-" if report["rpo_seconds"] is None else f"{report['rpo_seconds']:.3f} s", "-"),
            ("RTO: declared failure to writable", "-" if rto is None else f"{rto:.1f} s",
             "-" if rto_limit is None else f"at most {rto_limit} s")]
    if report["failback_bytes_shipped"] is not None:
        value = _bytes(report["failback_bytes_shipped"])
        if report["failback_fraction"] is not None:
            value += f" of {_bytes(report['volume_size'])} ({report['failback_fraction']:.2%})"
        limit = obj["max_failback_fraction"]
        rows.append(("Failback: bytes shipped", value,
                     "-" if limit is None else f"at most {limit:.2%}"))
    return rows


def markdown(report: dict) -> str:
    lines = [f"# DR drill {report['name']}: {report['result'].upper()}", "",
             "; ".join(_about(report, "`")), "", "| Measure | Value | Objective |", "|---|---|---|"]
    lines += [f"| {measure} | {value} | {objective} |"
              for measure, value, objective in _measures(report)]
    lines += ["", "## Checks", "", "| Check | Result | Detail |", "|---|---|---|"]
    lines += [f"| {_cell(c['name'])} | {c['status']} | {_cell(c['message'])} |"
              for c in report["checks"]]
    if report["reasons"]:
        lines += ["", "## Why it failed", ""] + [f"- {r}" for r in report["reasons"]]
    lines += ["", "## Timeline", "", "| # | Time (UTC) | + seconds | Event | Detail |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {e['time']} | {e['offset_seconds']:.3f} | {_cell(e['event'])} | "
              f"{_cell(e.get('detail', ''))} |" for n, e in enumerate(report["timeline"], 1)]
    return "\n".join(lines) + "\n"


# The look of report.html and of the drill index (replicator.drill.index): one style
# sheet in the page itself, so a page copied out of the report directory still reads.
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1d2329; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #c8cdd2; padding: .25em .6em; text-align: left;
         vertical-align: top; }
th { background: #eef1f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass, .passed { color: #176b2c; font-weight: 600; }
.fail, .failed, .unreadable { color: #b3261e; font-weight: 600; }
.skipped, .noreport { color: #6b7178; }
pre { background: #f4f6f8; padding: .6em; overflow-x: auto; }
svg text { font: 12px system-ui, sans-serif; fill: #1d2329; }
"""


def html_document(title: str, body: list[str]) -> str:
    """A self-contained HTML page: TITLE (escaped here) and BODY, lines already escaped."""
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>",
                      "</head>", "<body>", *body, "</body>", "</html>"]) + "\n"


def html_table(head: list[str], rows: list[list[str]]) -> str:
    """A table from already escaped cells; a cell given as (html, css class) gets the class."""
    def cell(tag, value):
        if isinstance(value, tuple):
            return f'<{tag} class="{value[1]}">{value[0]}</{tag}>'
        return f"<{tag}>{value}</{tag}>"
    lines = ["<table>", "<tr>" + "".join(cell("th", h) for h in head) + "</tr>"]
    lines += ["<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</table>"])


def html_page(report: dict) -> str:
    """report.html: the result, the measures, the checks, why it failed (the step that
    failed, if one did) and the timeline."""
    e = html.escape
    result = report["result"]
    title = f"DR drill {report['name']}: {result.upper()}"
    body = [f'<h1>DR drill {e(report["name"])}: <span class="{result}">{result.upper()}</span></h1>',
            f"<p>{e('; '.join(_about(report)))}</p>",
            html_table(["Measure", "Value", "Objective"],
                       [[e(m), (e(v), "num"), e(o)] for m, v, o in _measures(report)]),
            "<h2>Checks</h2>",
            html_table(["Check", "Result", "Detail"],
                       [[e(c["name"]), (e(c["status"]), c["status"]), e(c["message"])]
                        for c in report["checks"]])]
    if report["reasons"]:
        body += ["<h2>Why it failed</h2>", "<ul>"]
        body += [f"<li>{e(r)}</li>" for r in report["reasons"]] + ["</ul>"]
    step = report.get("failed_step")
    if isinstance(step, dict) and step.get("error"):
        body += [f"<h2>Failed step: {e(str(step.get('step', '')))}</h2>",
                 f"<pre>{e(str(step['error']))}</pre>"]
    body += ["<h2>Timeline</h2>",
             html_table(["#", "Time (UTC)", "+ seconds", "Event", "Detail"],
                        [[(str(n), "num"), e(ev["time"]), (f"{ev['offset_seconds']:.3f}", "num"),
                          e(ev["event"]), e(ev.get("detail", ""))]
                         for n, ev in enumerate(report["timeline"], 1)])]
    return html_document(title, body)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _text(value, none: str = "") -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def write_text(path: str, text: str) -> None:
    """Make TEXT the content of PATH (0644), atomically: a reader never sees half of it."""
    statefile.write_new(path, text.encode("utf-8"), 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replicator.drill.report",
        description="Write the DR drill report (report.json, report.xml, report.md, "
                    "report.html) from a drill description. Exit 0 when the drill passed, "
                    "3 when it failed, 1 on an error.")
    parser.add_argument("--input", required=True, help="drill description (JSON), - for stdin")
    parser.add_argument("--dir", required=True, help="directory to write the report into")
    parser.add_argument("--json", action="store_true", help="print the report paths as JSON")
    args = parser.parse_args(argv)
    try:
        if args.input == "-":
            drill = json.load(sys.stdin)
        else:
            with open(args.input, encoding="utf-8") as f:
                drill = json.load(f)
        if not isinstance(drill, dict):
            raise ValueError("the drill description is not a JSON object")
        report = build_report(drill)
        paths = _write_files(args.dir, report)
    except (OSError, ValueError, TypeError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"result": report["result"], **paths}))
    else:
        print(f"drill {report['result']}: " + ", ".join(paths.values()))
    return 0 if report["result"] == "pass" else 3


if __name__ == "__main__":
    sys.exit(main())
