"""The index of scheduled DR exercise runs: retention, rows, index.json and index.html,
and that no report's content can make it fail."""

import json
import os
import tempfile
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import cli
from replicator.drill import index, report

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def drill(rto=5.0, rpo_seconds=0.0, lost=0, **extra):
    return {"name": "dr-exercise", "group": "db", "rpo_writes_lost": lost,
            "rpo_seconds": rpo_seconds, "rto_seconds": rto,
            "timeline": [{"event": "declared_failure", "time": T0},
                         {"event": "writable", "time": T0 + rto}],
            "objectives": {"failback": False, "max_rto_seconds": 60},
            **extra}


def run(base, name, groups=None, log=True):
    """A run directory as the scheduled runner leaves it: ansible.log and GROUP/report.*."""
    path = base / name
    path.mkdir()
    if log:
        (path / "ansible.log").write_text("PLAY RECAP\n")
    for group, d in (groups or {}).items():
        report.write_report(str(path / group), d)
    return path


class Page(HTMLParser):
    def __init__(self, path):
        super().__init__()
        self.tags, self.hrefs, self.text = [], [], []
        with open(path, encoding="utf-8") as f:
            self.feed(f.read())

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.hrefs += [value for name, value in attrs if name == "href"]

    def handle_data(self, data):
        self.text.append(data)


def test_rows_trend_and_links(tmp_path):
    run(tmp_path, "20270115T080000Z", {"db": drill(rto=4.0), "web": drill(rto=9.5)})
    run(tmp_path, "20270215T080000Z", {"db": drill(rto=6.0, takeover={"rpo_records": 0}),
                                       "web": drill(rto=70.0, lost=2, rpo_seconds=0.25)})
    idx = index.write_index(str(tmp_path), keep=12)
    assert idx["removed"] == [] and idx["keep"] == 12
    rows = [(r["run"], r["group"], r["result"], r["rto_seconds"]) for r in idx["rows"]]
    assert rows == [("20270115T080000Z", "db", "pass", 4.0), ("20270115T080000Z", "web", "pass", 9.5),
                    ("20270215T080000Z", "db", "pass", 6.0), ("20270215T080000Z", "web", "fail", 70.0)]
    last = idx["rows"][-1]
    assert last == {"run": "20270215T080000Z", "time": "2027-02-15T08:00:00Z", "group": "web",
                    "result": "fail", "rpo_writes_lost": 2, "rpo_records": None,
                    "rpo_seconds": 0.25, "rto_seconds": 70.0,
                    "report": "20270215T080000Z/web/report.html",
                    "log": "20270215T080000Z/ansible.log", "error": None}
    assert idx["rows"][2]["rpo_records"] == 0  # the takeover's, from report.json
    with open(tmp_path / "index.json") as f:
        assert json.load(f) == idx

    page = Page(tmp_path / "index.html")
    text = "".join(page.text)
    assert "2 run(s) kept (at most 12)" in text and "Last run 2027-02-15T08:00:00Z" in text
    assert page.tags.count("svg") == 2 and page.tags.count("polyline") == 4  # a line per group
    assert "2027-02-15T08:00:00Z web: 70.000 s (fail)" in text  # the dot's tooltip
    assert "script" not in page.tags
    # newest first, each row linked to its report and its run's log, relative to the index
    assert page.hrefs[:2] == ["20270215T080000Z/web/report.html", "20270215T080000Z/ansible.log"]
    for href in page.hrefs:
        assert (tmp_path / href).is_file()


def test_keep_deletes_the_oldest_runs_and_nothing_else(tmp_path):
    for month in range(1, 6):
        run(tmp_path, f"2027{month:02d}15T080000Z", {"db": drill()})
    outside = tmp_path.parent / "elsewhere"
    outside.mkdir()
    (outside / "keep-me").write_text("x")
    not_runs = ["20260101T000000Z.bak", "notes", "20261399T000000Z", "2026010T000000Z"]
    for name in not_runs:
        (tmp_path / name).mkdir()
    (tmp_path / "20250101T000000Z").write_text("a file, not a run")
    os.symlink(outside, tmp_path / "20240101T000000Z")  # a link is not a run either
    (tmp_path / ".lock").write_text("")

    idx = index.write_index(str(tmp_path), keep=2)
    assert idx["removed"] == ["20270115T080000Z", "20270215T080000Z", "20270315T080000Z"]
    assert index.runs(str(tmp_path)) == ["20270415T080000Z", "20270515T080000Z"]
    assert sorted({r["run"] for r in idx["rows"]}) == index.runs(str(tmp_path))
    for name in not_runs + ["20250101T000000Z", "20240101T000000Z", ".lock"]:
        assert os.path.lexists(tmp_path / name), name
    assert (outside / "keep-me").exists()
    assert "Deleted by this index (beyond 2): 20270115T080000Z" in "".join(
        Page(tmp_path / "index.html").text)
    assert index.write_index(str(tmp_path), keep=2)["removed"] == []


def test_unreadable_reports_and_runs_without_a_report_are_rows(tmp_path):
    r1 = run(tmp_path, "20270115T080000Z")                       # failed before any drill
    r2 = run(tmp_path, "20270116T080000Z", {"db": drill()}, log=False)
    (r2 / "web").mkdir()                                         # a drill that was cut short
    (r2 / "web" / "drill.json").write_text("{}")
    r3 = run(tmp_path, "20270117T080000Z", {"db": drill(), "web": drill(), "app": drill()})
    (r3 / "db" / "report.json").write_text('{"result": "pass", "rto_sec')  # cut off
    (r3 / "web" / "report.json").write_text('[1, 2]')
    (r3 / "app" / "report.json").write_text('{"result": "maybe"}')
    (r3 / "bin").mkdir()
    (r3 / "bin" / "report.json").write_bytes(b"\xff\xfe{}")
    rows = {(r["run"], r["group"]): r for r in index.write_index(str(tmp_path))["rows"]}
    assert rows[("20270115T080000Z", None)]["result"] == "no report"
    assert rows[("20270115T080000Z", None)]["log"] == "20270115T080000Z/ansible.log"
    assert rows[("20270116T080000Z", "db")]["result"] == "pass"
    assert rows[("20270116T080000Z", "db")]["log"] is None
    assert rows[("20270116T080000Z", "web")]["result"] == "no report"
    assert rows[("20270116T080000Z", "web")]["error"] == "no report.json"
    for group, why in (("db", "report.json: "), ("web", "not a drill report (a JSON list)"),
                       ("app", "not a drill report (result 'maybe')"), ("bin", "report.json: ")):
        row = rows[("20270117T080000Z", group)]
        assert row["result"] == "unreadable" and why in row["error"], row
        page = "report.json" if group == "bin" else "report.html"  # bin has only report.json
        assert row["rto_seconds"] is None and row["report"] == f"20270117T080000Z/{group}/{page}"
    assert r1.exists()
    text = "".join(Page(tmp_path / "index.html").text)
    assert "unreadable: report.json is not a drill report (a JSON list)" in text
    assert "Last run 2027-01-17T08:00:00Z: FAIL" in text


def test_measures_that_are_not_numbers_are_not_measured(tmp_path):
    d = tmp_path / "20270115T080000Z" / "db"
    d.mkdir(parents=True)
    (d / "report.json").write_text('{"result": "pass", "rto_seconds": NaN, "rpo_seconds": 1e400,'
                                   ' "rpo_writes_lost": true, "takeover": {"rpo_records": "0"}}')
    (row,) = index.write_index(str(tmp_path))["rows"]
    assert (row["rto_seconds"], row["rpo_seconds"], row["rpo_writes_lost"],
            row["rpo_records"]) == (None, None, None, None)
    assert row["report"] == "20270115T080000Z/db/report.json"  # the only file there
    assert "not measured in any run" in "".join(Page(tmp_path / "index.html").text)


def test_names_are_escaped(tmp_path):
    run(tmp_path, "20270115T080000Z", {'<b onclick="x">db': drill()})
    index.write_index(str(tmp_path))
    page = Page(tmp_path / "index.html")
    assert "b" not in page.tags
    assert '<b onclick="x">db' in page.text
    assert "20270115T080000Z/%3Cb%20onclick%3D%22x%22%3Edb/report.html" in page.hrefs


def test_an_empty_base_directory_gets_an_index(tmp_path):
    idx = index.write_index(str(tmp_path))
    assert idx["rows"] == [] and idx["keep"] == index.DEFAULT_KEEP
    assert "0 run(s) kept" in "".join(Page(tmp_path / "index.html").text)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least the newest run must be kept"):
        index.write_index(str(tmp_path), keep=0)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        index.write_index(str(tmp_path / "f"))
    with pytest.raises(ValueError, match="is not a directory"):
        index.write_index(str(tmp_path / "missing"))


def test_command_line(tmp_path, capsys):
    for day in (15, 16, 17):
        run(tmp_path, f"202701{day}T080000Z", {"db": drill()})
    assert cli.main(["drill", "index", "--dir", str(tmp_path), "--keep", "2"]) == 0
    assert capsys.readouterr().out == (f"2 run(s) in {tmp_path}/index.html; "
                                       "deleted 20270115T080000Z\n")
    assert cli.main(["drill", "index", "--dir", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["removed"] == [] and len(printed["rows"]) == 2
    assert cli.main(["drill", "index", "--dir", str(tmp_path), "--keep", "0"]) == 1
    assert "index: error: keep 0: at least the newest run must be kept" in capsys.readouterr().err
    assert cli.main(["drill", "index", "--dir", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["drill"]) == 2
    assert "index: the index of scheduled DR exercise runs" in capsys.readouterr().err


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
MEASURES = ("result", "rpo_writes_lost", "rpo_seconds", "rto_seconds", "takeover")
REPORT = st.one_of(
    JSON,
    st.fixed_dictionaries({}, optional={key: JSON | st.sampled_from(["pass", "fail"])
                                        for key in MEASURES}),
    st.fixed_dictionaries({"result": st.sampled_from(["pass", "fail"])},
                          optional={"rpo_seconds": JSON, "rto_seconds": JSON,
                                    "rpo_writes_lost": JSON,
                                    "takeover": st.dictionaries(st.just("rpo_records"), JSON)}))


@settings(max_examples=150, deadline=None)
@given(reports=st.lists(REPORT | st.binary(max_size=40), min_size=1, max_size=4))
def test_no_report_content_breaks_the_index(reports):
    with tempfile.TemporaryDirectory() as base:
        for n, content in enumerate(reports):
            group = os.path.join(base, f"202701{n + 10}T080000Z", "db")
            os.makedirs(group)
            with open(os.path.join(group, "report.json"), "wb") as f:
                f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
        idx = index.write_index(base, keep=3)
        assert len(idx["removed"]) == max(0, len(reports) - 3)
        for row in idx["rows"]:
            assert row["result"] in ("pass", "fail", "unreadable")
            for key in ("rpo_seconds", "rto_seconds"):
                assert row[key] is None or isinstance(row[key], float)
        with open(os.path.join(base, "index.json")) as f:
            assert json.load(f)["rows"] == idx["rows"]
        assert Page(os.path.join(base, "index.html")).tags.count("svg") == 2
