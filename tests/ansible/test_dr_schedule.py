"""The scheduled DR exercise without a lab: the role replicator_dr_schedule (playbooks/
dr_schedule.yml) installs its runner and a cron entry, changes nothing the second time,
shows its diff in check mode, refuses a bad schedule with a message, and removes it all;
the systemd units it renders pass `systemd-analyze verify` (this machine has no systemd
as PID 1, so the timer is never enabled here: the lab test runs the cron path); and the
runner, with a stand-in for the exercise that writes a real report, makes its run
directories, keeps the newest, writes the index, holds a lock and exits as the playbook."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from datetime import datetime

import pytest

from tests.agents import wait_until
from tests.ansible.cron_harness import cron_daemon, lock_free, needs_cron
from tests.ansible.lab_harness import playbook

# A stand-in for dr_exercise.yml: the report of one group, written by the real `replicator
# drill report` (found on the PATH the runner sets up), failing as the exercise fails.
FAKE_EXERCISE = """\
- name: A stand-in for the DR exercise
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Take a while
      ansible.builtin.command: sleep {{ fake_sleep }}
      when: fake_sleep is defined
      changed_when: false
    - name: Write the report
      ansible.builtin.command:
        argv: [replicator, drill, report, --input, "-", --dir, "{{ dr_report_dir }}/{{ fake_group }}"]
        stdin: "{{ {'group': fake_group, 'rpo_writes_lost': fake_lost | int, 'rpo_seconds': 0.5,
          'objectives': {'failback': false},
          'timeline': [{'event': 'declared_failure', 'time': 1800000000},
                       {'event': 'writable', 'time': 1800000007.5}]} | to_json }}"
      register: report
      failed_when: report.rc not in [0, 3]
      changed_when: true
    - name: The drill passed
      ansible.builtin.assert:
        that: report.rc == 0
"""
INVENTORY = "all:\n  hosts:\n    localhost:\n      ansible_connection: local\n" \
            "      ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n"


@pytest.fixture
def where(tmp_path):
    """Everything the role installs, inside tmp_path (nothing under /etc or /usr/local)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "exercise.yml").write_text(FAKE_EXERCISE)
    (project / "hosts.yml").write_text(INVENTORY)
    return {"replicator_dr_schedule_project_dir": str(project),
            "replicator_dr_schedule_inventory": str(project / "hosts.yml"),
            "replicator_dr_schedule_playbook": "exercise.yml",
            "replicator_dr_schedule_extra_vars": {"fake_group": "db", "fake_lost": 0},
            "replicator_dr_schedule_report_dir": str(tmp_path / "reports"),
            "replicator_dr_schedule_runner": str(tmp_path / "bin" / "replicator-dr-run"),
            "replicator_dr_schedule_cron_file": str(tmp_path / "cron.d" / "replicator-dr-exercise"),
            "replicator_dr_schedule_systemd_dir": str(tmp_path / "units"),
            "replicator_dr_schedule_scheduler": "cron"}


def schedule(where, *args, check=True, **overrides):
    os.makedirs(os.path.dirname(where["replicator_dr_schedule_runner"]), exist_ok=True)
    os.makedirs(os.path.dirname(where["replicator_dr_schedule_cron_file"]), exist_ok=True)
    return playbook("dr_schedule.yml", "-e", json.dumps({**where, **overrides}), *args,
                    check=check, timeout=300)


def recap(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("localhost ")]
    return line


def cron_entry(where) -> list[str]:
    with open(where["replicator_dr_schedule_cron_file"]) as f:
        return [line for line in f.read().splitlines() if not line.startswith("#")]


def test_the_cron_path_installs_changes_nothing_again_and_is_removed(where):
    out = schedule(where, "--check", "--diff")  # check mode: the diff, nothing written
    assert "+0 3 * * 0 root " in out and "--day-of-month 1-7" in out
    assert not os.path.exists(where["replicator_dr_schedule_runner"])
    assert not os.path.exists(where["replicator_dr_schedule_cron_file"])

    assert "failed=0" in recap(schedule(where))
    runner = where["replicator_dr_schedule_runner"]
    # the default "0 3 1-7 * 0" is the first Sunday, as OnCalendar's "Sun *-*-1..7 03:00":
    # cron runs every Sunday and the runner skips the Sundays after the 7th
    assert cron_entry(where) == [f"0 3 * * 0 root {runner} --day-of-month 1-7"]
    assert os.access(runner, os.X_OK)
    with open(runner) as f:
        text = f.read()
    assert f"project={where['replicator_dr_schedule_project_dir']}\n" in text
    assert "keep=12\n" in text and "extra=(-e '{\"fake_group\": \"db\", \"fake_lost\": 0}')" in text
    assert os.path.isdir(where["replicator_dr_schedule_report_dir"])
    assert "changed=0" in recap(schedule(where, "--diff"))

    # only one day restricted: cron's own fields, no day-of-month check
    schedule(where, replicator_dr_schedule_cron="30 2 1 * *")
    assert cron_entry(where) == [f"30 2 1 * * root {runner}"]  # replaced, not added
    schedule(where, replicator_dr_schedule_cron="*/5 * * * 1-5")
    assert cron_entry(where) == [f"*/5 * * * 1-5 root {runner}"]

    reports = os.path.join(where["replicator_dr_schedule_report_dir"], "20270115T080000Z")
    os.mkdir(reports)
    out = schedule(where, "--check", "--diff", replicator_dr_schedule_state="absent")
    assert "changed=1" in recap(out) and os.path.exists(runner)
    for path in (runner, where["replicator_dr_schedule_cron_file"]):
        assert f"changed: [localhost] => (item={path})" in out
    assert "changed=1" in recap(schedule(where, replicator_dr_schedule_state="absent"))
    assert not os.path.exists(runner)
    assert not os.path.exists(where["replicator_dr_schedule_cron_file"])
    assert os.path.isdir(reports)  # the reports stay
    assert "changed=0" in recap(schedule(where, replicator_dr_schedule_state="absent"))


@pytest.mark.parametrize("overrides, message", [
    ({"replicator_dr_schedule_cron": "0 3 * *"}, "it needs five fields"),
    ({"replicator_dr_schedule_cron": "@monthly"}, "it needs five fields"),
    ({"replicator_dr_schedule_cron": "0 3 1-7/2 * 0"},
     "must then be days and ranges like 1-7 or 1,15"),
    ({"replicator_dr_schedule_keep": 0}, "must be at least 1"),
    ({"replicator_dr_schedule_extra_vars": {"dr_report_dir": "/tmp/x"}},
     "must not set dr_report_dir"),
    ({"replicator_dr_schedule_scheduler": "systemd", "replicator_dr_schedule_on_calendar": "Sun 99:00"},
     "systemd-analyze calendar says Failed to parse calendar specification"),
    ({"replicator_dr_schedule_project_dir": "/nonexistent/project"},
     "(/nonexistent/project: not a directory)"),
    ({"replicator_dr_schedule_ansible_playbook": "/nonexistent/ansible-playbook"},
     "(/nonexistent/ansible-playbook: not an executable)"),
    ({"replicator_dr_schedule_state": "stopped"},
     "value of replicator_dr_schedule_state must be one of: present, absent, got: stopped"),
])
def test_a_bad_setting_is_refused_with_a_message(where, overrides, message):
    if overrides.get("replicator_dr_schedule_scheduler") == "systemd" and not shutil.which(
            "systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    out = schedule(where, check=False, **overrides)
    assert "failed=1" in recap(out) and message in out, out[-3000:]
    assert not os.path.exists(where["replicator_dr_schedule_runner"])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_systemd_units_verify(where, tmp_path):
    """The systemd path's units, rendered by the role's units.yml: systemd-analyze verify
    reads them as systemd would (enabling the timer needs systemd as PID 1)."""
    play = tmp_path / "units.yml"
    play.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.include_role:\n"
                    "        name: voltrail.replicator.replicator_dr_schedule\n"
                    "        tasks_from: units\n")
    os.makedirs(where["replicator_dr_schedule_systemd_dir"])
    runner = tmp_path / "bin" / "replicator-dr-run"
    runner.parent.mkdir()
    runner.write_text("#!/bin/sh\n")
    runner.chmod(0o755)  # verify wants ExecStart's program to exist
    out = playbook(str(play), "-e", json.dumps({**where, "replicator_dr_schedule_on_calendar":
                                                "Mon..Fri *-*-* 02:30"}))
    assert "changed=1" in recap(out)
    units = [os.path.join(where["replicator_dr_schedule_systemd_dir"], f"replicator-dr-exercise.{kind}")
             for kind in ("service", "timer")]
    p = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(units[1]) as f:
        timer = f.read()
    assert "OnCalendar=Mon..Fri *-*-* 02:30\n" in timer
    assert "Unit=replicator-dr-exercise.service\n" in timer and "WantedBy=timers.target" in timer
    with open(units[0]) as f:
        assert f"ExecStart={runner}\n" in f.read()


def run_now(where, *args):
    """The installed runner, in an environment like cron's (a bare PATH, nothing else)."""
    home = os.path.join(where["replicator_dr_schedule_report_dir"], os.pardir, "home")
    os.makedirs(home, exist_ok=True)
    return subprocess.run([where["replicator_dr_schedule_runner"], *args], capture_output=True,
                          text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"})


def runs(where) -> list[str]:
    base = where["replicator_dr_schedule_report_dir"]
    return sorted(n for n in os.listdir(base) if os.path.isdir(os.path.join(base, n))
                  and n[0].isdigit())


def index_of(where) -> dict:
    with open(os.path.join(where["replicator_dr_schedule_report_dir"], "index.json")) as f:
        return json.load(f)


def test_the_runner_runs_the_exercise_into_a_run_directory_and_indexes(where):
    schedule(where, replicator_dr_schedule_keep=2,
             replicator_dr_schedule_extra_args=["-e", "fake_lost=0", "-e", "fake_group=db"])
    base = where["replicator_dr_schedule_report_dir"]
    p = run_now(where)
    assert p.returncode == 0, p.stderr
    (first,) = runs(where)
    assert datetime.strptime(first, "%Y%m%dT%H%M%SZ")
    for name in ("ansible.log", "db/report.json", "db/report.xml", "db/report.md", "db/report.html"):
        assert os.path.isfile(os.path.join(base, first, name)), name
    with open(os.path.join(base, first, "ansible.log")) as f:
        assert "The drill passed" in f.read()
    (row,) = index_of(where)["rows"]
    assert (row["run"], row["group"], row["result"], row["rto_seconds"]) == (first, "db", "pass", 7.5)
    assert os.path.isfile(os.path.join(base, "index.html"))
    assert f"run {base}/{first}: playbook exit 0, index exit 0" in p.stderr

    # a failed drill: the runner exits as the playbook did, and the index shows it
    schedule(where, replicator_dr_schedule_keep=2,
             replicator_dr_schedule_extra_vars={"fake_group": "db", "fake_lost": 3})
    p = run_now(where)
    assert p.returncode == 2, p.stderr
    # a third run: the oldest goes (keep 2)
    schedule(where, replicator_dr_schedule_keep=2)
    assert run_now(where).returncode == 0
    kept = runs(where)
    assert len(kept) == 2 and first not in kept
    idx = index_of(where)
    assert idx["removed"] == [first]
    assert [r["result"] for r in idx["rows"]] == ["fail", "pass"]


def test_runs_never_overlap_and_the_day_of_month_is_checked(where):
    schedule(where)
    base = where["replicator_dr_schedule_report_dir"]
    with open(os.path.join(base, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run in progress
        p = run_now(where)
        assert p.returncode == 75 and "another run holds" in p.stderr
        assert runs(where) == []
    today = datetime.now().day  # cron's day: local time
    other = 1 if today != 1 else 2
    p = run_now(where, "--day-of-month", f"{other}")
    assert p.returncode == 0 and runs(where) == []  # not today: nothing ran
    for bad in (["--day-of-month"], ["--day-of-month", "1-7/2"], ["--now"]):
        p = run_now(where, *bad)
        assert p.returncode == 2 and "usage:" in p.stderr
    assert runs(where) == []
    p = run_now(where, "--day-of-month", f"{other},{max(1, today - 1)}-{today}")
    assert p.returncode == 0 and len(runs(where)) == 1, p.stderr


def test_a_run_out_of_time_is_stopped(where):
    schedule(where, replicator_dr_schedule_timeout_seconds=2,
             replicator_dr_schedule_extra_vars={"fake_group": "db", "fake_lost": 0, "fake_sleep": 120})
    p = run_now(where)
    assert p.returncode == 124, p.stderr
    (run,) = runs(where)
    (row,) = index_of(where)["rows"]
    assert row["run"] == run and row["result"] == "no report"  # stopped before its report
    assert row["log"] == f"{run}/ansible.log"


@needs_cron
@pytest.mark.timeout(400)
def test_cron_fires_the_installed_runner(where, tmp_path):
    """The cron path end to end, with the stand-in exercise: Debian's cron (over the
    test's cron.d only) fires the runner the role installed, every minute, in cron's own
    environment; a run directory with its report and the index appear."""
    base = where["replicator_dr_schedule_report_dir"]
    with cron_daemon(str(tmp_path)):
        schedule(where, replicator_dr_schedule_cron="* * * * *")
        try:
            wait_until(lambda: os.path.exists(os.path.join(base, "index.json")), 150,
                       "cron to fire the runner and the run to be indexed", interval=1)
        finally:
            schedule(where, replicator_dr_schedule_state="absent")
            wait_until(lambda: lock_free(os.path.join(base, ".lock")), 120, "the run to end")
    (row,) = index_of(where)["rows"][:1]
    assert row["result"] == "pass" and row["group"] == "db", row
    assert os.path.isfile(os.path.join(base, row["run"], "db", "report.html"))
