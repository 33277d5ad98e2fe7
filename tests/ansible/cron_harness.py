"""A cron daemon for a test: Debian's cron, started as the test's own child in a mount
namespace of its own whose /etc/cron.d is a directory of the test's and whose /etc/crontab
is empty, so that it fires only the test's entries and no job of this machine's. The
namespace is a slave of the machine's: unmounts there (a lab's `ip netns del`) reach it,
so it keeps nothing of a lab alive."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess

import pytest

needs_cron = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("cron") or os.path.exists("/usr/sbin/cron")),
    reason="needs root (a mount namespace) and cron (scripts/setup.sh installs it)")


@contextlib.contextmanager
def cron_daemon(directory):
    """Run cron over DIRECTORY/cron.d (made here, where a test's cron_file goes) until the
    block ends; cron is then stopped by its PID. Its log is DIRECTORY/cron.log."""
    cron_d = os.path.join(directory, "cron.d")
    os.makedirs(cron_d, mode=0o755, exist_ok=True)
    crontab = os.path.join(directory, "crontab")
    with open(crontab, "w"):
        pass
    with open(os.path.join(directory, "cron.log"), "wb") as log:
        # unshare execs sh, which execs cron: the Popen's PID is cron's
        cron = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
             'mount --bind "$1" /etc/cron.d && mount --bind "$2" /etc/crontab && exec cron -f',
             "cron", cron_d, crontab], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)
    try:
        yield cron
    finally:
        cron.terminate()
        cron.wait(timeout=30)


def lock_free(path: str) -> bool:
    """Nobody holds the flock on PATH (the scheduled runner's lock: no run is going on)."""
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
