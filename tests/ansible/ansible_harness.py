"""Run our Ansible modules and filters in-process from pytest: module_utils are loaded
from plugins/module_utils under the names Ansible gives them, module arguments go
through ansible's own patch_module_args, and the module's JSON answer is returned."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys

from ansible.module_utils.testing import patch_module_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "replicator")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


MODULE_UTILS = ("replicator_agent", "replicator_lab_net", "replicator_lab",  # dependencies first
                "replicator_lab_prometheus")


def module_utils(name: str):
    """plugins/module_utils/NAME.py as ansible.module_utils.NAME (with what it imports)."""
    for dep in MODULE_UTILS[:MODULE_UTILS.index(name) + 1]:
        key = f"ansible.module_utils.{dep}"
        if key not in sys.modules:
            _load(key, os.path.join(ROOT, "plugins", "module_utils", f"{dep}.py"))
    return sys.modules[f"ansible.module_utils.{name}"]


def filters(name: str) -> dict:
    module_utils("replicator_agent")
    return _load(f"replicator_filter_{name}", os.path.join(ROOT, "plugins", "filter",
                                                           f"{name}.py")).FilterModule().filters()


def library_module(name: str):
    """library/NAME.py as a Python module."""
    module_utils(MODULE_UTILS[-1])
    return _load(f"replicator_module_{name}", os.path.join(ROOT, "library", f"{name}.py"))


def run_module(name: str, args: dict, check_mode: bool = False) -> dict:
    """Run library/NAME.py's main() with ARGS; return its result (failed=True on fail_json)."""
    mod = library_module(name)
    out = io.StringIO()
    with patch_module_args({**args, "_ansible_check_mode": check_mode}), \
            contextlib.redirect_stdout(out):
        try:
            mod.main()
        except SystemExit:
            pass
    return json.loads(out.getvalue())
