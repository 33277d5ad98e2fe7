"""The DR exercise refuses what it cannot honour before it touches anything (no lab needed:
the checks run on the controller): a destructive drill not asked for knowingly, a copy drill
with no volume set aside for it (copy is the default), a marker or an application check it
cannot honour; a drill that started still writes its report saying which step refused and
why."""

import json
import os

import pytest

from tests.ansible.lab_harness import playbook

REFUSED = "Check the marker and the application check"
DESTRUCTIVE = {"dr_exercise_mode": "destructive", "replicator_safe_mode": False}


@pytest.mark.parametrize("extra", [
    {**DESTRUCTIVE, "dr_exercise_marker": "before-upgrade"},
    {**DESTRUCTIVE, "dr_exercise_app_check": "fsck.ext4 -fn {data}"},
    {"dr_exercise_mode": "copy", "dr_exercise_volume_name": "log",
     "dr_exercise_marker": "not a name"},
    {"dr_exercise_mode": "copy", "dr_exercise_volume_name": "log",
     "dr_exercise_marker": "m1", "dr_exercise_marker_freeze": "fsfreeze -f /mnt"},  # no thaw
    {"dr_exercise_mode": "copy", "dr_exercise_volume_name": "log",
     "dr_exercise_marker_freeze": "true", "dr_exercise_marker_thaw": "true"},       # no marker
])
def test_a_marker_or_app_check_it_cannot_honour_is_refused_with_a_report(extra, tmp_path):
    report_dir = str(tmp_path / "dr")
    out = playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}", "-e", "dr_groups=db",
                   "-e", json.dumps(extra), check=False, timeout=300)
    assert "the DR exercise failed for db" in out, out[-3000:]
    with open(os.path.join(report_dir, "db", "report.json")) as f:
        report = json.load(f)
    assert report["result"] == "fail"
    assert report["failed_step"]["step"] == REFUSED
    assert "they need dr_exercise_mode=copy" in report["failed_step"]["error"]
    assert report["timeline"] == [] and report["acknowledged_writes"] == 0  # nothing was started


def test_a_destructive_drill_needs_safe_mode_off(tmp_path):
    report_dir = str(tmp_path / "dr")
    out = playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}",
                   "-e", "dr_exercise_mode=destructive", check=False, timeout=300)
    assert "add -e replicator_safe_mode=false" in out, out[-3000:]
    assert not os.path.exists(report_dir)  # refused before any group was touched


def test_the_default_is_a_copy_drill_which_needs_a_volume_set_aside(tmp_path):
    report_dir = str(tmp_path / "dr")
    out = playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}", "-e", "dr_groups=db",
                   check=False, timeout=300)
    assert "set aside for drills" in out, out[-3000:]
    with open(os.path.join(report_dir, "db", "report.json")) as f:
        report = json.load(f)
    assert report["result"] == "fail" and report["mode"] == "copy"
    assert report["timeline"] == [] and report["acknowledged_writes"] == 0
