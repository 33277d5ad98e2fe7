"""`replicator agent --log-format text|json`: JSON lines for log shippers, and no second
timestamp when stderr is the journal (systemd's JOURNAL_STREAM names it)."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from replicator import logs
from tests.agents import free_port, wait_until

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def records(handler: logging.Handler) -> None:
    log = logging.getLogger("replicator.test-logs")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        log.info("journal %s is %d%% full", "db", 81)
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            log.exception("cannot append to %s", "db")
    finally:
        log.removeHandler(handler)


def test_json_lines_carry_time_level_logger_message_and_the_exception():
    out = io.StringIO()
    records(logs.handler("dc1-app", "json", out))
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first.pop("time").endswith("+00:00")
    assert first == {"level": "info", "logger": "replicator.test-logs", "node": "dc1-app",
                     "message": "journal db is 81% full"}
    assert (second["level"], second["message"]) == ("error", "cannot append to db")
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert second["exception"].endswith("OSError: [Errno 28] No space left on device")


def test_text_has_a_timestamp_unless_stderr_is_the_journal(tmp_path, monkeypatch):
    def text(stream) -> list[str]:
        records(logs.handler("dc1-app", "text", stream))
        stream.flush()
        with open(stream.name) as f:
            return f.read().splitlines()

    with open(tmp_path / "plain.log", "w") as plain:
        lines = text(plain)
    assert STAMP.match(lines[0]) and lines[0].endswith(
        " dc1-app INFO replicator.test-logs: journal db is 81% full")
    with open(tmp_path / "journal.log", "w") as journal:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        lines = text(journal)
        assert lines[0] == "dc1-app INFO replicator.test-logs: journal db is 81% full"
        assert lines[1] == "dc1-app ERROR replicator.test-logs: cannot append to db"
        assert lines[2] == "Traceback (most recent call last):"
    # inherited by a process whose stderr is not the journal: timestamps again
    with open(tmp_path / "elsewhere.log", "w") as elsewhere:
        assert STAMP.match(text(elsewhere)[0])


def run_agent(tmp_path, *flags: str, journal: bool = False) -> list[str]:
    """Start a real agent (`replicator agent -c ... FLAGS`), wait for it to be up, stop it
    with SIGTERM; its stderr lines."""
    cfg = {"node": "n1", "listen": f"127.0.0.1:{free_port()}",
           "nbd_listen": f"127.0.0.1:{free_port()}", "state_dir": str(tmp_path / "state"),
           "admin_socket": str(tmp_path / "admin.sock"), "tls": False,
           "groups": [{"name": "db", "role": "primary", "journal_size": "16MiB",
                       "volumes": [{"name": "data", "path": str(tmp_path / "data.img"),
                                    "size": "1MiB", "allocation": "sparse"}]}]}
    (tmp_path / "agent.yml").write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(log_path, "w") as log:
        if journal:
            st = os.fstat(log.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "replicator.cli", "agent", "-c",
                                 str(tmp_path / "agent.yml"), *flags], stderr=log, env=env)
    try:
        wait_until(lambda: "node n1 up" in log_path.read_text() or proc.poll() is not None,
                   30, "the agent to start")
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log_path.read_text().splitlines()


def test_the_agent_logs_json_lines(tmp_path):
    lines = [json.loads(line) for line in run_agent(tmp_path, "--log-format", "json")]
    assert {line["logger"] for line in lines} >= {"replicator.agent"}
    assert all(set(line) == {"time", "level", "logger", "node", "message"} for line in lines)
    assert any(line["message"].startswith("node n1 up") for line in lines)
    assert lines[-1]["message"] == "node n1 stopped"


@pytest.mark.parametrize("journal", [False, True])
def test_the_agent_logs_text_with_one_timestamp(tmp_path, journal):
    lines = run_agent(tmp_path, journal=journal)
    up = next(line for line in lines if "node n1 up" in line)
    assert bool(STAMP.match(up)) != journal
    assert STAMP.sub("", up).startswith("n1 INFO replicator.agent: node n1 up")
