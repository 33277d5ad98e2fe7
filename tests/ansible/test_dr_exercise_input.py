"""The DR exercise refuses a marker or an application check it cannot honour before it
touches anything (no lab needed: the check runs on the controller), and still writes its
report saying which step refused and why."""

import json
import os

import pytest

from tests.ansible.lab_harness import playbook

REFUSED = "Check the marker and the application check"


@pytest.mark.parametrize("extra", [
    {"dr_exercise_marker": "before-upgrade"},                      # destructive mode
    {"dr_exercise_app_check": "fsck.ext4 -fn {data}"},             # destructive mode
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
