"""The DR drill report: JSON, JUnit XML, Markdown and HTML from a drill description."""

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from replicator.drill import report

T0 = 1_700_000_000.0


def drill(**overrides):
    d = {
        "name": "nightly",
        "group": "db",
        "timeline": [
            {"event": "declared_failure", "time": T0 + 10},
            {"event": "workload_started", "time": T0},
            {"event": "promoted", "time": T0 + 14.5, "detail": "dc2-dr | 12 records replayed"},
            {"event": "writable", "time": T0 + 15.25},
            {"event": "verified", "time": T0 + 20},
            {"event": "failed_back", "time": T0 + 60},
        ],
        "rpo_writes_lost": 0,
        "rpo_seconds": 0.0,
        "failback_bytes_shipped": 2 << 20,
        "volume_size": 64 << 20,
        "objectives": {"max_rpo_writes": 0, "max_rto_seconds": 30,
                       "max_failback_fraction": 0.25},
    }
    d.update(overrides)
    return d


def written(tmp_path, d):
    paths = report.write_report(str(tmp_path / "out"), d)
    assert set(paths) == {"json", "xml", "md", "html"}
    with open(paths["json"]) as f:
        j = json.load(f)
    x = ET.parse(paths["xml"]).getroot()
    with open(paths["md"]) as f:
        md = f.read()
    return j, x, md


def cases(root):
    suites = root.findall("testsuite")
    assert root.tag == "testsuites" and len(suites) == 1
    suite = suites[0]
    found = {c.get("name"): c for c in suite.findall("testcase")}
    assert int(suite.get("tests")) == len(found) == int(root.get("tests"))
    assert int(suite.get("failures")) == sum(c.find("failure") is not None
                                             for c in found.values())
    assert int(suite.get("skipped")) == sum(c.find("skipped") is not None
                                            for c in found.values())
    assert suite.get("errors") == "0"
    return suite, found


def test_passing_drill(tmp_path):
    j, x, md = written(tmp_path, drill())
    assert j["result"] == "pass" and j["reasons"] == []
    assert j["rpo_writes_lost"] == 0 and j["rpo_seconds"] == 0.0
    assert j["rto_seconds"] == 5.25          # declared_failure -> writable, from the timeline
    assert j["failback_fraction"] == pytest.approx(2 / 64)
    assert [e["event"] for e in j["timeline"]] == [
        "workload_started", "declared_failure", "promoted", "writable", "verified",
        "failed_back"]                          # sorted by time
    assert j["timeline"][1]["offset_seconds"] == 10.0
    assert j["timeline"][0]["time"] == "2023-11-14T22:13:20.000Z"
    assert j["started"] == j["timeline"][0]["time"] and j["duration_seconds"] == 60.0
    assert {c["status"] for c in j["checks"]} == {"passed"}

    suite, found = cases(x)
    assert set(found) == {"RPO within objective", "RTO within objective",
                          "failback restored primary",
                          "failback shipped only changed regions", "drill completed"}
    assert suite.get("failures") == "0" and float(suite.get("time")) == 60.0
    assert suite.get("timestamp") == "2023-11-14T22:13:20.000"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["rpo_writes_lost"] == "0" and props["result"] == "pass"
    assert props["rpo_seconds"] == "0.0"
    assert "declared_failure" in suite.find("system-out").text

    assert md.startswith("# DR drill nightly: PASS")
    assert "| 2 | 2023-11-14T22:13:30.000Z | 10.000 | declared_failure |  |" in md
    assert "dc2-dr \\| 12 records replayed" in md      # a pipe cannot break the table
    assert "| RTO: declared failure to writable | 5.2 s | at most 30 s |" in md
    assert "| RPO: acknowledged (flushed) writes lost | 0 | at most 0 |" in md
    assert "| RPO: seconds of acknowledged (flushed) writes lost | 0.000 s | - |" in md


def test_lost_writes_fail_the_rpo_check(tmp_path):
    j, x, md = written(tmp_path, drill(rpo_writes_lost=3, rpo_seconds=0.0421))
    assert j["result"] == "fail" and j["rpo_seconds"] == 0.042
    assert j["reasons"] == ["RPO within objective: 3 acknowledged (flushed) writes lost "
                            "(0.042 s); objective at most 0"]
    suite, found = cases(x)
    failure = found["RPO within objective"].find("failure")
    assert failure is not None and "3 acknowledged (flushed) writes lost" in failure.get("message")
    assert "| RPO: seconds of acknowledged (flushed) writes lost | 0.042 s | - |" in md
    assert found["RTO within objective"].find("failure") is None
    assert suite.get("failures") == "1"
    assert "## Why it failed" in md and "FAIL" in md.splitlines()[0]


def test_slow_recovery_fails_the_rto_check(tmp_path):
    j, x, _ = written(tmp_path, drill(rto_seconds=45.0))    # a measured RTO wins
    assert j["rto_seconds"] == 45.0 and j["result"] == "fail"
    _, found = cases(x)
    assert found["RTO within objective"].find("failure") is not None


def test_iso_timestamps_and_rpo_objective_above_zero(tmp_path):
    d = drill(rpo_writes_lost=2, timeline=[
        {"event": "declared_failure", "time": "2024-03-01T10:00:00Z"},
        {"event": "writable", "time": "2024-03-01T10:00:07.5+00:00"},
        {"event": "failed_back", "time": "2024-03-01T10:05:00"},    # naive: UTC
    ])
    d["objectives"]["max_rpo_writes"] = 5
    j, x, _ = written(tmp_path, d)
    assert j["result"] == "pass" and j["rto_seconds"] == 7.5
    assert j["timeline"][2]["offset_seconds"] == 300.0


def test_missing_measures_fail_and_missing_objectives_skip(tmp_path):
    d = drill(rpo_writes_lost=None, failback_bytes_shipped=None,
              timeline=[{"event": "declared_failure", "time": T0}],
              objectives={"max_failback_fraction": 0.1})
    j, x, md = written(tmp_path, d)
    status = {c["name"]: c["status"] for c in j["checks"]}
    assert status == {"RPO within objective": "failed",
                      "RTO within objective": "skipped",
                      "failback restored primary": "failed",
                      "failback shipped only changed regions": "failed",
                      "drill completed": "passed"}
    _, found = cases(x)
    assert found["RTO within objective"].find("skipped") is not None
    assert found["RPO within objective"].find("failure") is not None
    assert j["rto_seconds"] is None
    assert "| RTO: declared failure to writable | - | - |" in md


def test_drill_without_failback(tmp_path):
    d = drill(timeline=drill()["timeline"][:4])
    d["objectives"] = {"failback": False, "max_rto_seconds": 30}
    j, x, _ = written(tmp_path, d)
    assert j["result"] == "pass"
    _, found = cases(x)
    assert found["failback restored primary"].find("skipped") is not None


def test_caller_reasons_and_checks(tmp_path):
    d = drill(reasons=["failover playbook failed on dc2-dr"],
              checks=[{"name": "replicas identical", "passed": True, "message": "sha256"},
                      {"name": "bunker reachable", "passed": False, "message": "timeout"}])
    j, x, _ = written(tmp_path, d)
    assert j["result"] == "fail"
    assert j["reasons"] == ["failover playbook failed on dc2-dr",
                            "bunker reachable: timeout"]
    _, found = cases(x)
    assert found["replicas identical"].find("failure") is None
    assert found["bunker reachable"].find("failure").get("message") == "timeout"
    assert "failover playbook failed" in found["drill completed"].find("failure").text


def test_caller_result_fail_without_reasons(tmp_path):
    j, _, _ = written(tmp_path, drill(result="fail"))
    assert j["result"] == "fail"
    assert j["checks"][-1] == {"name": "drill completed", "status": "failed",
                               "message": "the drill reported failure"}


def test_other_keys_are_carried_into_the_json(tmp_path):
    ledger_check = {"acknowledged": 1000, "missing": 0}
    j, _, _ = written(tmp_path, drill(ledger=ledger_check, inventory="lab"))
    assert j["ledger"] == ledger_check and j["inventory"] == "lab"


def test_rewriting_a_report_replaces_it(tmp_path):
    written(tmp_path, drill(rpo_writes_lost=1))
    j, _, _ = written(tmp_path, drill())
    assert j["result"] == "pass"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.html", "report.json", "report.md", "report.xml"]


@pytest.mark.parametrize("bad", [
    {"timeline": [{"event": "declared_failure"}]},
    {"timeline": [{"time": T0}]},
    {"timeline": [{"event": "x", "time": "yesterday"}]},
    {"objectives": {"max_rpo": 0}},
    {"checks": [{"passed": True}]},
])
def test_malformed_drill_is_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        report.write_report(str(tmp_path), drill(**bad))


def test_command_line(tmp_path, capsys):
    src = tmp_path / "drill.json"
    src.write_text(json.dumps(drill()))
    out = tmp_path / "r"
    assert report.main(["--input", str(src), "--dir", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["result"] == "pass" and printed["xml"] == str(out / "report.xml")
    src.write_text(json.dumps(drill(rpo_writes_lost=4)))
    assert report.main(["--input", str(src), "--dir", str(out)]) == 3
    src.write_text("[]")
    assert report.main(["--input", str(src), "--dir", str(out)]) == 1
    assert "error" in capsys.readouterr().err


def test_an_rpo_without_objective_is_measured_not_judged(tmp_path):
    """An async replica with no bunker: the writes lost are reported, the check skipped."""
    d = drill(rpo_writes_lost=7)
    d["objectives"]["max_rpo_writes"] = None
    j, x, md = written(tmp_path, d)
    assert j["result"] == "pass" and j["rpo_writes_lost"] == 7
    (rpo,) = [c for c in j["checks"] if c["name"] == "RPO within objective"]
    assert rpo["status"] == "skipped" and "7 acknowledged (flushed) writes lost" in rpo["message"]
    _, found = cases(x)
    assert found["RPO within objective"].find("skipped") is not None
    assert "| RPO: acknowledged (flushed) writes lost | 7 | - |" in md


def test_rpo_seconds_from_the_ledger_check(tmp_path):
    """The playbook passes the ledger check whole: its rpo_seconds is the report's
    unless given apart; without either it is unmeasured, not 0."""
    d = drill(rpo_writes_lost=5, ledger={"rpo_writes_lost": 5, "rpo_seconds": 1.25})
    del d["rpo_seconds"]
    d["objectives"]["max_rpo_writes"] = None
    j, x, md = written(tmp_path, d)
    assert j["rpo_seconds"] == 1.25 and j["ledger"]["rpo_seconds"] == 1.25
    assert "5 acknowledged (flushed) writes lost (1.250 s)" in j["checks"][0]["message"]
    assert "| RPO: seconds of acknowledged (flushed) writes lost | 1.250 s | - |" in md
    suite, _ = cases(x)
    assert {p.get("name"): p.get("value") for p in suite.find("properties")}[
        "rpo_seconds"] == "1.25"
    del d["ledger"]
    j, _, md = written(tmp_path, d)
    assert j["rpo_seconds"] is None
    assert "| RPO: seconds of acknowledged (flushed) writes lost | - | - |" in md


class _Page(HTMLParser):
    """What a browser would take from report.html: its tags, text and attributes."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [value or "" for _, value in attrs]

    def handle_data(self, data):
        self.text.append(data)


def html_of(tmp_path, d):
    paths = report.write_report(str(tmp_path / "out"), d)
    with open(paths["html"], encoding="utf-8") as f:
        return _Page(f.read())


def test_html_report_shows_result_measures_checks_and_timeline(tmp_path):
    page = html_of(tmp_path, drill())
    text = " ".join(page.text)
    assert "DR drill nightly: PASS" in text
    assert "RTO: declared failure to writable" in text and "5.2 s" in text and "at most 30 s" in text
    assert "RPO: acknowledged (flushed) writes lost" in text and "2.0 MiB of 64.0 MiB (3.12%)" in text
    assert "failback shipped only changed regions" in text
    assert "2023-11-14T22:13:30.000Z" in text and "dc2-dr | 12 records replayed" in text
    assert "Why it failed" not in text


def test_html_report_of_a_failed_step_is_escaped_and_self_contained(tmp_path):
    """Whatever a step's error or an event's detail says, it is text on the page, and the
    page loads nothing: no script, no link, no image, no external address."""
    hostile = '<script>alert("x")</script><img src="http://example.invalid/x.png">'
    timeline = drill()["timeline"][:2] + [{"event": "promoted", "time": T0 + 12,
                                           "detail": hostile}]
    page = html_of(tmp_path, drill(timeline=timeline, reasons=[f"step failed: {hostile}"],
                                   failed_step={"step": "Promote <b>", "error": hostile}))
    text = " ".join(page.text)
    assert "DR drill nightly: FAIL" in text
    assert text.count(hostile) == 4  # the detail, the reason, the check, the failed step
    assert "Failed step: Promote <b>" in text
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2",
                              "p", "span", "table", "tr", "th", "td", "ul", "li", "pre"}
    assert not [a for a in page.attrs if "//" in a or "javascript" in a]
