"""The DR exercise on every topology the inventory allows (inventories/matrix: one lab,
one group per topology), in destructive and in copy mode, each drill's ledger checked
(RPO 0 where the promoted replica is a sync replica or a bunker exists; measured
otherwise), its failback verified, and a drill whose step fails still writing its report.
The five-host lab topology is drilled in tests/ansible/test_lab.py."""

import json
import os
import xml.etree.ElementTree as ET

import pytest

from tests.agents import wait_until
from tests.ansible.lab_harness import DESTRUCTIVE, Lab, lab_marks

pytestmark = lab_marks(timeout=1500)

# group: (promoted by default, RPO promised to be 0, the links of the promoted node
# while it is primary: {(source, target): mode})
CASES = {
    "bunker3": ("m3-far", True, {("m3-far", "m1-bunker"): "sync"}),
    "syncpair": ("m2-dr", True, {}),
    "asyncpair": ("m2-dr", False, {}),
    "cascade": ("m2-dr", False, {("m2-dr", "m3-far"): "async"}),
    "reverse": ("m1-app", True, {}),
}


@pytest.fixture(scope="module")
def matrix():
    lab = Lab("matrix")
    assert sorted(lab.groups) == sorted(CASES)
    try:
        lab.playbook("lab.yml", "-e", "lab_state=up")
        assert "failed=0" in lab.playbook("site.yml")
        lab.playbook("pair.yml")
        yield lab
    finally:
        lab.playbook("lab.yml", "-e", "lab_state=down", check=False)
        assert lab.leftovers() == []


def reports(report_dir):
    out = {}
    for group in CASES:
        with open(os.path.join(report_dir, group, "report.json")) as f:
            out[group] = json.load(f)
    return out


def assert_declared_topology(lab):
    """Every group is back as the inventory declares it: roles, sources, links, data."""
    for name, g in lab.groups.items():
        for node in lab.members(name):
            st = lab.group_status(node, name)
            source = next((lk["from"] for lk in g["links"] if lk["to"] == node), None)
            assert st["source"] == source and st["role_from"] == "config", (name, node, st)
            want = {(lk["to"], lk["mode"]) for lk in g["links"] if lk["from"] == node}
            assert {(t["node"], t["mode"]) for t in st["targets"]} == want, (name, node, st)
        lab.wait_converged(group=name)
        lab.assert_identical(group=name)


def test_destructive_drill_of_every_group(matrix, tmp_path):
    lab = matrix
    report_dir = str(tmp_path / "dr")
    out = lab.playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}", *DESTRUCTIVE,
                       "-e", "dr_exercise_writes=200", timeout=1400, check=False)
    for group, report in reports(report_dir).items():
        promoted, covered, links = CASES[group]
        assert report["result"] == "pass", (group, report["checks"], report.get("failed_step"))
        assert report["promoted"] == promoted
        assert report["ledger"]["acknowledged"] >= 200 and report["ledger"]["prefix"] is True
        if group in ("asyncpair", "syncpair"):  # crashed mid-workload, not after it
            assert report["ledger"]["writer_stopped"] == "connection_lost", report["ledger"]
        if covered:
            assert report["rpo_writes_lost"] == 0, (group, report["ledger"])
        else:  # measured, not judged: the report says how many were lost
            assert isinstance(report["rpo_writes_lost"], int) and report["rpo_writes_lost"] >= 0
            assert report["objectives"]["max_rpo_writes"] is None
        assert 0 < report["rto_seconds"] < 60
        assert report["failback_bytes_shipped"] is not None
        assert report["failback_bytes_shipped"] < report["volume_size"] / 2
        assert [e["event"] for e in report["timeline"]][-1] == "failed_back"
        during = {(lk["source"], lk["target"]): lk["mode"] for lk in report["takeover_links"]}
        assert during == links, (group, during)
        assert all(lk["state"] == "replicating" for lk in report["takeover_links"])
        suite = ET.parse(os.path.join(report_dir, group, "report.xml")).getroot().find("testsuite")
        assert int(suite.get("failures")) == 0
        print(f"{group}: promoted {promoted}, RPO {report['rpo_writes_lost']} writes, "
              f"RTO {report['rto_seconds']:.2f} s, failback {report['failback_bytes_shipped']} B")
    assert "failed=0" in out, out[-3000:]
    assert_declared_topology(lab)


def test_copy_drill_of_every_group(matrix, tmp_path):
    lab = matrix
    before = {(g, n): lab.group_status(n, g) for g in lab.groups for n in lab.members(g)}
    report_dir = str(tmp_path / "dr")
    out = lab.playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}",
                       "-e", "dr_exercise_mode=copy", "-e", "dr_exercise_writes=150",
                       timeout=1400, check=False)
    for group, report in reports(report_dir).items():
        promoted, covered, _ = CASES[group]
        assert report["result"] == "pass", (group, report)
        assert report["takeover"]["role"] == "copy" and report["promoted"] == promoted
        assert report["ledger"]["acked_before"] is not None
        if covered:
            assert report["rpo_writes_lost"] == 0, (group, report["ledger"])
        assert [e["event"] for e in report["timeline"]][-1] == "copy_deleted"
        assert not os.path.exists(lab.host_path(promoted, f"/var/lib/replicator/drill/{group}"))
    assert "failed=0" in out, out[-3000:]
    for (g, n), was in before.items():
        now = lab.group_status(n, g)
        assert (now["role"], now["generation"]) == (was["role"], was["generation"]), (g, n)
    assert_declared_topology(lab)


def test_a_failed_drill_still_writes_its_report(matrix, tmp_path):
    """The copy cannot be made (its directory would be under /dev/null): the drill stops
    at that step, stops its workload, and still writes JSON, JUnit and the summary with
    result FAIL, the step, its error and what was measured until then; exit non-zero."""
    lab = matrix
    report_dir = str(tmp_path / "dr")
    out = lab.playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}", "-e", "dr_groups=syncpair",
                       "-e", "dr_exercise_mode=copy", "-e", "dr_exercise_copy_dir=/dev/null/copy",
                       "-e", "dr_exercise_writes=100", check=False, timeout=600)
    assert "the DR exercise failed for syncpair" in out
    d = os.path.join(report_dir, "syncpair")
    assert sorted(os.listdir(report_dir)) == ["syncpair"]
    with open(os.path.join(d, "report.json")) as f:
        report = json.load(f)
    assert report["result"] == "fail"
    assert report["failed_step"]["step"] == "Copy mode, promote a copy, replaying the bunker into it"
    assert "/dev/null/copy" in report["failed_step"]["error"]
    assert any("promote a copy" in r for r in report["reasons"])
    assert report["acknowledged_writes"] >= 100  # the measures taken until then
    assert [e["event"] for e in report["timeline"]] == ["declared_failure"]
    suite = ET.parse(os.path.join(d, "report.xml")).getroot().find("testsuite")
    assert int(suite.get("failures")) >= 1
    assert "FAIL" in open(os.path.join(d, "report.md")).read()
    def ledger():
        with open(os.path.join(d, "ledger.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    # the workload was stopped by the failed drill, not left writing
    end = wait_until(lambda: ledger()[-1]["event"] == "end" and ledger()[-1], 30, "the ledger's end")
    assert end["reason"] == "signal"
    wait_until(lambda: not os.path.exists(f"/proc/{ledger()[0]['pid']}"), 30, "the writer to exit")
    assert_declared_topology(lab)
