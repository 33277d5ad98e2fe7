"""The admin socket operates the agent (promote, demote, resync...): root's only. Its
file is mode 0600, and should someone loosen that, the agent still refuses every uid but
root's, by the connection's peer credentials, with an error that says so."""

import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from tests.agents import wait_until

NOBODY = 65534
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def agent(topology):
    """A lone agent whose admin socket is in a directory other users may traverse (the
    test's own tmp directories are 0700), removed at the end."""
    where = tempfile.mkdtemp(prefix="replicator-admin-")
    try:
        os.chmod(where, 0o711)
        topo = topology(["a"], [], start=False)
        a = topo["a"]
        a.config["admin_socket"] = os.path.join(where, "admin.sock")
        a.save_config()
        a.start()
        yield a
    finally:
        shutil.rmtree(where)


def _as_nobody(path: str) -> subprocess.CompletedProcess:
    """`replicator status`'s request, made by uid 65534."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from replicator import admin\n"
            "try:\n"
            "    admin.request(sys.argv[2], 'status', timeout=10)\n"
            "except admin.AdminError as exc:\n"
            "    sys.exit(f'refused: {exc}')\n"
            "print('answered')\n")
    # (the system's python: the test's may live under /root, which uid 65534 cannot read;
    # admin.py needs nothing but the standard library)
    return subprocess.run(["/usr/bin/python3", "-c", code, REPO, path], capture_output=True,
                          text=True, timeout=60, user=NOBODY, group=NOBODY, cwd="/")


def test_the_admin_socket_is_roots_only(agent):
    path = agent.config["admin_socket"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    p = _as_nobody(path)
    assert p.returncode != 0 and "answered" not in p.stdout
    assert "permission denied" in p.stderr and "run this as root" in p.stderr, p.stderr
    assert agent.status()["node"] == "a"  # root is answered


def test_a_loosened_socket_still_answers_root_only(agent):
    path = agent.config["admin_socket"]
    os.chmod(path, 0o666)  # an operator's mistake
    p = _as_nobody(path)
    assert p.returncode != 0 and "answered" not in p.stdout
    assert f"uid {NOBODY}" in p.stderr and "answers root only" in p.stderr, p.stderr
    wait_until(lambda: f"uid {NOBODY}" in open(agent.log_path).read(), 10,
               "the refusal logged")
