"""replicator_wheelhouse builds the agent's wheels once per source version, and with
find_links builds them from a directory of wheels alone (no package index): from the one
scripts/setup.sh makes, and not at all from an empty one."""

import os
import tarfile

import pytest

from tests.ansible.ansible_harness import ROOT, run_module

WHEELS = os.path.join(ROOT, ".venv", "wheelhouse")

pytestmark = pytest.mark.skipif(not os.path.isdir(WHEELS),
                                reason="scripts/setup.sh makes .venv/wheelhouse")


def test_built_once_from_the_wheel_directory(tmp_path):
    args = {"source": ROOT, "cache": str(tmp_path / "cache"), "find_links": WHEELS}
    planned = run_module("replicator_wheelhouse", args, check_mode=True)
    assert planned["changed"] and planned["wheel"] == "" and not os.path.exists(args["cache"])
    built = run_module("replicator_wheelhouse", args)
    assert built["changed"] and not built.get("failed"), built
    assert built["wheel"].startswith("replicator-") and built["pip_wheel"].startswith("pip-")
    with tarfile.open(built["archive"]) as tar:
        names = tar.getnames()
    assert built["wheel"] in names and any(n.startswith("zstandard-") for n in names), names
    again = run_module("replicator_wheelhouse", args)
    assert not again["changed"] and again["build_id"] == built["build_id"]
    assert again["wheel"] == built["wheel"]


def test_an_empty_wheel_directory_fails_and_leaves_no_build(tmp_path):
    os.makedirs(tmp_path / "empty")
    args = {"source": ROOT, "cache": str(tmp_path / "cache"), "find_links": str(tmp_path / "empty")}
    res = run_module("replicator_wheelhouse", args)
    assert res["failed"] and "pip wheel" in res["msg"], res
    assert os.listdir(args["cache"]) == []  # the half-made build is removed
