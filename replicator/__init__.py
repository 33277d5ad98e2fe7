"""Volume replication agent: captures writes over NBD, journals them per consistency
group and ships them to peer agents over TCP (see DESIGN.md in the shared docs)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("replicator")  # the installed distribution's (pyproject.toml)
except PackageNotFoundError:  # the source tree as the collection ships it: its filters
    __version__ = "unknown"   # check configs with config.py on a controller without it
