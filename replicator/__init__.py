"""Volume replication agent: captures writes over NBD, journals them per consistency
group and ships them to peer agents over TCP (see DESIGN.md in the shared docs)."""

from importlib.metadata import version

__version__ = version("replicator")  # the installed distribution's (pyproject.toml)
