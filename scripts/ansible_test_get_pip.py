"""Stands in for get-pip.py, which ansible-test downloads from a host this machine cannot
reach: pip from the interpreter's own ensurepip, then `pip install ARGS` (from PyPI);
get-pip's own options (--no-setuptools, --no-wheel) are not pip's and are left out."""
import ensurepip
import os
import subprocess
import sys

config = os.environ.get("PIP_CONFIG_FILE")
ensurepip.bootstrap(upgrade=True)  # which points PIP_CONFIG_FILE at /dev/null: undo that
os.environ.pop("PIP_CONFIG_FILE", None) if config is None else os.environ.update(PIP_CONFIG_FILE=config)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--upgrade", *args]))
