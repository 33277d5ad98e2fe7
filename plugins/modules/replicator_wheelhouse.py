#!/usr/bin/python
# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build the project's wheel and its dependencies' wheels once, on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replicator_wheelhouse
short_description: Wheels of the replicator and its dependencies, built once per source version
version_added: 0.1.0
author: [The replicator team (@voltrail)]
description:
  - Hashes the source files named by I(paths) into a build id and, unless I(cache)/<build id>
    already exists, runs C(pip wheel) for the project into it (dependencies included), so that
    hosts install offline with C(pip install --no-index --find-links). The build directory also
    holds C(wheels.tar), all wheels in one file, so a host gets them in one transfer. Older
    builds beyond I(keep) are removed. Runs on the controller (delegate_to localhost).
options:
  source:
    description: The project directory (with pyproject.toml).
    type: path
    required: true
  cache:
    description: Directory that holds one subdirectory of wheels per build id.
    type: path
    required: true
  paths:
    description: Files and directories under I(source) whose content defines a build.
    type: list
    elements: str
    default: [pyproject.toml, replicator]
  python:
    description: Python that runs pip (its version is the one the hosts must run).
    type: path
  keep:
    description: How many builds to keep in I(cache).
    type: int
    default: 3
  find_links:
    description:
      - A directory of wheels to build from instead of a package index (C(pip wheel --no-index
        --find-links)), for a controller without one (an air-gapped site, a test lab). It must
        hold the dependencies' wheels and the build requirements (setuptools), and pip's own
        wheel.
    type: path
"""

EXAMPLES = r"""
- name: Wheels of the replicator, built once per source version
  voltrail.replicator.replicator_wheelhouse:
    source: "{{ playbook_dir }}/.."
    cache: "{{ lookup('env', 'HOME') }}/.cache/replicator-wheels"
  delegate_to: localhost
  run_once: true

- name: The same, from a directory of wheels (no package index)
  voltrail.replicator.replicator_wheelhouse:
    source: /srv/src/replicator
    cache: /var/cache/replicator-wheels
    find_links: /srv/wheels
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
build_id:
  description: Hash of the source files (16 hex digits).
  type: str
  returned: always
dir:
  description: Directory of this build's wheels.
  type: str
  returned: always
archive:
  description: C(dir)/wheels.tar, every wheel of the build.
  type: str
  returned: always
wheel:
  description: File name of the project's own wheel (empty in check mode before a build).
  type: str
  returned: always
pip_wheel:
  description: File name of pip's wheel, runnable as C(python PIP_WHEEL/pip install ...).
  type: str
  returned: always
python_version:
  description: major.minor of I(python); compiled dependencies only work on that version.
  type: str
  returned: always
"""

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile

from ansible.module_utils.basic import AnsibleModule

SKIP_DIRS = {"__pycache__", ".git", "build", "dist"}
ARCHIVE = "wheels.tar"


def source_files(source: str, paths: list[str]) -> list[str]:
    files = []
    for rel in paths:
        top = os.path.join(source, rel)
        if os.path.isfile(top):
            files.append(top)
            continue
        for d, dirs, names in os.walk(top):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
            files += [os.path.join(d, n) for n in names if not n.endswith((".pyc", ".pyo"))]
    return sorted(files)


def source_hash(source: str, paths: list[str]) -> str:
    h = hashlib.sha256()
    for path in source_files(source, paths):
        h.update(os.path.relpath(path, source).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def wheel_named(directory: str, project: str) -> str:
    for name in sorted(os.listdir(directory)):
        if name.startswith(project + "-") and name.endswith(".whl"):
            return name
    return ""


def main():
    module = AnsibleModule(
        argument_spec=dict(
            source=dict(type="path", required=True),
            cache=dict(type="path", required=True),
            paths=dict(type="list", elements="str", default=["pyproject.toml", "replicator"]),
            python=dict(type="path"),
            keep=dict(type="int", default=3),
            find_links=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    python = p["python"] or sys.executable
    if not os.path.isfile(os.path.join(p["source"], "pyproject.toml")):
        module.fail_json(msg=f"{p['source']} has no pyproject.toml: set "
                             "replicator_agent_source_dir to the project directory")
    version = module.run_command([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 check_rc=True)[1].strip()
    build_id = source_hash(p["source"], p["paths"])
    target = os.path.join(p["cache"], build_id)
    result = dict(build_id=build_id, dir=target, archive=os.path.join(target, ARCHIVE),
                  python_version=version, changed=False)
    if os.path.isfile(result["archive"]):
        module.exit_json(wheel=wheel_named(target, "replicator"),
                         pip_wheel=wheel_named(target, "pip"), **result)
    result["changed"] = True  # from here on, a build (or would be one, in check mode)
    if module.check_mode:
        module.exit_json(wheel="", pip_wheel="", **result)
    os.makedirs(p["cache"], exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{build_id}-", dir=p["cache"])
    try:
        # pip's own wheel too: hosts run pip from it, so their venv needs no pip of its own
        index = ["--no-index", "--find-links", p["find_links"]] if p["find_links"] else []
        for what in ([p["source"]], ["--no-deps", "pip"]):
            rc, out, err = module.run_command([python, "-m", "pip", "wheel", "--quiet", *index,
                                               "--wheel-dir", tmp, *what])
            if rc != 0:
                module.fail_json(msg=f"pip wheel {' '.join(what)} failed (exit {rc})", stderr=err,
                                 stdout=out)
        with tarfile.open(os.path.join(tmp, ARCHIVE), "w") as tar:
            for name in sorted(os.listdir(tmp)):
                if name.endswith(".whl"):
                    tar.add(os.path.join(tmp, name), arcname=name)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete build
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    builds = sorted((e for e in os.scandir(p["cache"]) if e.is_dir() and not e.name.startswith(".")),
                    key=lambda e: e.stat().st_mtime, reverse=True)
    for old in builds[p["keep"]:]:
        shutil.rmtree(old.path, ignore_errors=True)
    module.exit_json(wheel=wheel_named(target, "replicator"), pip_wheel=wheel_named(target, "pip"),
                     **result)


if __name__ == "__main__":
    main()
