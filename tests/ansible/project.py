"""A new user's Ansible project outside this checkout: the collection voltrail.replicator
built from the checkout and installed into PROJECT/collections, and an ansible.cfg that
names nothing of ours but that path."""

from __future__ import annotations

import os
import subprocess

from tests.ansible.ansible_harness import ROOT
from tests.ansible.lab_harness import BIN


def run(*cmd, cwd=ROOT, env=None, check=True, timeout=900) -> str:
    """BIN/CMD[0] with CMD[1:]; its stdout (and an AssertionError with its output on failure)."""
    env = env or dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                      PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    p = subprocess.run([os.path.join(BIN, cmd[0]), *cmd[1:]], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def build(out_dir) -> str:
    """The collection's tarball, built from the checkout into OUT_DIR."""
    run("ansible-galaxy", "collection", "build", "--force", "--output-path", str(out_dir))
    (name,) = [n for n in os.listdir(out_dir) if n.endswith(".tar.gz")]
    return os.path.join(out_dir, name)


def fresh_project(project, archive) -> dict:
    """Install ARCHIVE into PROJECT/collections; return the environment to run ansible in it."""
    os.makedirs(project, exist_ok=True)
    with open(os.path.join(project, "ansible.cfg"), "w") as f:
        f.write("[defaults]\ncollections_path = ./collections\n")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(project, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    run("ansible-galaxy", "collection", "install", "-p", "collections", archive, cwd=project, env=env)
    return env
