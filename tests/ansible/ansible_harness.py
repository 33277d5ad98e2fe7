"""Run our Ansible modules and filters in-process from pytest: they are imported as Ansible
imports them, from the collections voltrail.replicator and voltrail.replicator_lab (the
checkout, through the links scripts/setup.sh makes in .collections), module arguments go
through ansible's own patch_module_args, and the module's JSON answer is returned."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys

from ansible.module_utils.testing import patch_module_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "replicator")
COLLECTIONS = os.path.join(ROOT, ".collections")
if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)


def _plugin(kind: str, name: str):
    """plugins/KIND/NAME.py of the collection it belongs to (the lab's start with replicator_lab)."""
    collection = "replicator_lab" if name.startswith("replicator_lab") else "replicator"
    return importlib.import_module(f"ansible_collections.voltrail.{collection}.plugins.{kind}.{name}")


def module_utils(name: str):
    return _plugin("module_utils", name)


def filter_module(name: str):
    return _plugin("filter", name)


def filters(name: str) -> dict:
    return _plugin("filter", name).FilterModule().filters()


def library_module(name: str):
    return _plugin("modules", name)


def run_module(name: str, args: dict, check_mode: bool = False) -> dict:
    """Run module NAME's main() with ARGS; return its result (failed=True on fail_json)."""
    mod = library_module(name)
    out = io.StringIO()
    with patch_module_args({**args, "_ansible_check_mode": check_mode}), \
            contextlib.redirect_stdout(out):
        try:
            mod.main()
        except SystemExit:
            pass
    return json.loads(out.getvalue())
