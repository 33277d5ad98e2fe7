"""Shipping a group's journal to its targets: one Shipper per target.

  peer.py     connect, HELLO/WELCOME, the lineage decision; the Peer interface
  stream.py   the record stream: pump, early batches, FLUSH, acks
  resync.py   one resync of a target from its bitmap (full or checksum passes)
  verify.py   one online verify (hash probes placed in the stream)
  shipper.py  the sessions of one target, one after another, and its status
"""

from .peer import ShipError
from .shipper import Shipper

__all__ = ["ShipError", "Shipper"]
