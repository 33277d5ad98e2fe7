"""The replicator_agent role reloads a changed agent.yml (the agent keeps its pid and
its NBD clients), dry-runs the reload in check mode, and restarts the agent only for a
change the reload cannot take."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from replicator import admin
from tests.agents import free_port, wait_until
from tests.ansible.ansible_harness import ROOT
from tests.ansible.lab_harness import BIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the role makes root-owned files")
ENV = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
           PATH=f"{BIN}:{os.environ.get('PATH', '')}")
HOSTS = ("n1", "n2")
RESTART = "Restart replicator agent, one host at a time"


@pytest.fixture
def hosts():
    """Two loopback hosts' inventory (the role's paths under a short directory: admin
    socket paths must stay short); their supervised agents are stopped at the end."""
    root = tempfile.mkdtemp(prefix="rrld")
    for h in HOSTS:  # what the install step makes: the controller's replicator
        os.makedirs(os.path.join(root, h, "install", "bin"))
        os.symlink(os.path.dirname(BIN), os.path.join(root, h, "install", "venv"))
    host_vars = {h: {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "replicator_agent_python": sys.executable,
        "replicator_agent_address": "127.0.0.1", "replicator_agent_port": free_port(),
        "replicator_agent_nbd_port": free_port(), "replicator_agent_metrics_listen": "",
        "replicator_agent_tls": False, "replicator_agent_service_manager": "supervisor",
        "replicator_agent_install_dir": os.path.join(root, h, "install"),
        "replicator_agent_heartbeat_interval": 0.5, "replicator_agent_heartbeat_timeout": 3,
        **{f"replicator_agent_{d}_dir": os.path.join(root, h, d)
           for d in ("config", "state", "run", "log", "volume")}} for h in HOSTS}
    hosts = {"root": root, "vars": host_vars, "groups": [{
        "name": "db", "primary": "n1", "journal_size": "16MiB",
        "volumes": [{"name": "data", "size": "4MiB"}],
        "links": [{"from": "n1", "to": "n2", "mode": "sync"}]}]}
    yield hosts
    for h in HOSTS:
        supervise = os.path.join(root, h, "install", "bin", "replicator-supervise")
        if os.path.exists(supervise):
            subprocess.run([supervise, "stop"], capture_output=True, timeout=60)
    shutil.rmtree(root)


def play(hosts, *args) -> str:
    inventory = os.path.join(hosts["root"], "inventory.yml")
    with open(inventory, "w") as f:
        yaml.safe_dump({"all": {"children": {"replicator": {"hosts": hosts["vars"]}},
                                "vars": {"replicator_groups": hosts["groups"]}}}, f)
    p = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", inventory,
                        "tests/ansible/reload_role.yml", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    return p.stdout


def status(hosts, host: str) -> dict:
    sock = os.path.join(hosts["root"], host, "run", "admin.sock")
    return admin.request(sock, "status", timeout=5)


def handlers_run(out: str) -> list[str]:
    """The handlers that ran (not skipped) on n1, by name."""
    ran, name = [], None
    for line in out.splitlines():
        if line.startswith("RUNNING HANDLER"):
            name = line.split(" : ", 1)[1].split("]")[0]
        elif name and line.startswith(("changed: [n1]", "ok: [n1]")):
            ran.append(name)
    return ran


def test_the_role_reloads_what_it_can_and_restarts_for_what_it_cannot(hosts):
    play(hosts)
    wait_until(lambda: status(hosts, "n1")["groups"][0]["targets"][0]["state"] ==
               "replicating", 30, "n1 to replicate to n2")
    pid = status(hosts, "n1")["pid"]

    hosts["groups"][0]["links"][0]["mode"] = "async"  # live: reloaded
    out = play(hosts)
    assert "Reload the agent's configuration (live where it can be)" in handlers_run(out)
    assert RESTART not in handlers_run(out), out
    st = status(hosts, "n1")
    assert st["pid"] == pid and st["groups"][0]["targets"][0]["mode"] == "async"

    hosts["groups"][0]["journal_size"] = "32MiB"  # needs a restart
    config = os.path.join(hosts["root"], "n1", "config", "agent.yml")
    with open(config) as f:
        before = f.read()
    out = play(hosts, "--check", "--diff")
    assert "n1: the agent would restart for groups[db].journal_size" in out, out
    with open(config) as f:
        assert f.read() == before
    assert not os.path.exists(config + ".check")
    assert status(hosts, "n1")["pid"] == pid

    out = play(hosts)
    assert "n1: the agent restarts for groups[db].journal_size" in out
    assert RESTART in handlers_run(out)
    st = status(hosts, "n1")  # the restart handler returned once the agent answered
    assert st["pid"] != pid and st["groups"][0]["journal"]["capacity_bytes"] == 32 << 20
