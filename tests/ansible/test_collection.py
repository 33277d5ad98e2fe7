"""The Ansible side as collections: every module and filter of voltrail.replicator and
voltrail.replicator_lab is documented as ansible-doc shows it, and the built collection
installs and works by FQCN from a project directory outside this checkout (its role renders
a configuration the agent accepts), shipping none of the lab."""

import json
import os
import pathlib
import shutil
import tarfile
import tempfile

import pytest
import yaml

from replicator import config
from tests.ansible.ansible_harness import ROOT, filters
from tests.ansible.lab_harness import BIN
from tests.ansible.project import build, fresh_project, run

COLLECTIONS = {"voltrail.replicator": ROOT, "voltrail.replicator_lab": os.path.join(ROOT, "lab")}


def plugin_names(root, kind):
    return sorted(f[:-3] for f in os.listdir(os.path.join(root, "plugins", kind))
                  if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("collection", sorted(COLLECTIONS))
def test_every_module_is_documented_with_examples_and_return_values(collection):
    names = [f"{collection}.{m}" for m in plugin_names(COLLECTIONS[collection], "modules")]
    docs = json.loads(run("ansible-doc", "-t", "module", "--json", *names))
    assert sorted(docs) == names
    for name, d in docs.items():
        assert d["doc"]["short_description"] and d["doc"]["description"], name
        assert d.get("examples") and yaml.safe_load(d["examples"]), f"{name}: no EXAMPLES"
        assert d["return"], f"{name}: no RETURN"
        for option, spec in d["doc"].get("options", {}).items():
            assert spec.get("description"), f"{name}: option {option} has no description"


@pytest.mark.parametrize("collection", sorted(COLLECTIONS))
def test_every_filter_is_documented(collection):
    names = sorted(f"{collection}.{name}" for plugin in plugin_names(COLLECTIONS[collection], "filter")
                   for name in filters(plugin))
    docs = json.loads(run("ansible-doc", "-t", "filter", "--json", *names))
    assert sorted(docs) == names
    for name, d in docs.items():
        assert d["doc"]["short_description"] and d["doc"]["options"]["_input"], name
        assert d["examples"] and d["return"], name


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("build"))


def test_the_built_collection_ships_the_product_and_none_of_the_lab(built):
    with tarfile.open(built) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    assert manifest["collection_info"]["namespace"] == "voltrail"
    assert manifest["collection_info"]["license"] == ["GPL-3.0-or-later"]
    for needed in ("meta/runtime.yml", "LICENSE", "CHANGELOG.md", "pyproject.toml", "replicator/agent.py",
                   "roles/replicator_agent/tasks/main.yml", "playbooks/site.yml",
                   "plugins/modules/replicator_status.py", "plugins/filter/replicator_topology.py"):
        assert needed in names, needed
    for name in names:  # of tests/, only ansible-test's ignore files
        assert not name.startswith(("lab", "bench/", "molecule/", ".")), name
        assert not name.startswith("tests/") or name.startswith("tests/sanity"), name
        assert "replicator_lab" not in name and "inventories/lab" not in name, name


@pytest.fixture
def short_dir():
    """A directory with a short path (unix socket paths are rendered under it; pytest's
    tmp_path can be too long for them), removed afterwards."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="the role makes root-owned files")
def test_installed_outside_the_checkout_the_role_renders_by_fqcn(built, tmp_path, short_dir):
    """A new user's project: only the installed collection (no ansible.cfg of ours, no
    library path), an inventory of its own, roles and filters named by FQCN."""
    project = tmp_path / "project"
    shutil.copytree(os.path.join(ROOT, "inventories", "example"), project / "inventory")
    env = fresh_project(project, built)
    listed = run("ansible-galaxy", "collection", "list", "-p", "collections", "--format", "json",
                 cwd=project, env=env)
    assert "voltrail.replicator" in json.loads(listed)[str(project / "collections" / "ansible_collections")]
    render = short_dir  # admin socket paths are rendered under it
    os.makedirs(render / "install")
    os.symlink(os.path.dirname(BIN), render / "install" / "venv")
    (project / "render.yml").write_text(yaml.safe_dump([{
        "name": "Render", "hosts": "replicator", "gather_facts": False,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                 "replicator_agent_config_dir": f"{render}/{{{{ inventory_hostname }}}}",
                 "replicator_agent_state_dir": f"{render}/{{{{ inventory_hostname }}}}/state",
                 "replicator_agent_run_dir": f"{render}/{{{{ inventory_hostname }}}}/run",
                 "replicator_agent_install_dir": f"{render}/install",
                 "replicator_agent_state": "stopped", "replicator_agent_make_volume_dirs": False},
        "tasks": [{"name": "Valid topology", "ansible.builtin.assert": {"that": [
                       "replicator_groups | voltrail.replicator.replicator_topology_errors(groups['replicator']) == []"]}},
                  {"name": "Configure", "ansible.builtin.import_role": {
                       "name": "voltrail.replicator.replicator_agent", "tasks_from": "configure.yml"}}]}]))
    run("ansible-playbook", "-i", "inventory", "render.yml", cwd=project, env=env)
    rendered = sorted(os.listdir(render))
    assert len(rendered) > 2
    for host in rendered:
        if host != "install":
            assert config.load(str(render / host / "agent.yml")).node == host
    # the collection's playbooks by FQCN
    out = run("ansible-playbook", "-i", "inventory", "voltrail.replicator.site", "--list-tasks",
              cwd=project, env=env)
    assert "voltrail.replicator.replicator_agent : " in out
