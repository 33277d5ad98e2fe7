"""A consistency group on one node, as parts that own their state:

    commit.py    the write path: batches, the journal append, the written / durable /
                 flush points, the memtable readers see until a commit applies a batch
                 to the volumes, sync and flush waits (the durability contract)
    memtable.py  completed writes not yet in the volumes, laid over reads
    links.py     each target as the write path sees it (written and durable seq, in
                 sync, bitmap), and the floors writes and flushes wait for
    guard.py     lag limits: over / under (events), and the gate local writes wait
                 at while a target with on_lag block or throttle needs it
    retention.py what the journal must keep (targets, checkpoint, a bunker's far
                 replicas) and waiting for room in it
    checkpoint.py group.json: the seq the volumes hold durably, and the group's state
    lineage.py   generations, split brain, rolled-back data kept
    core.py      Group: composes them; role changes (promote, demote, reparent), a
                 replica's resync, logging targets (bitmaps), the checkpointer

Data flows NBD export / receiver -> Commit (journal, memtable, volumes) -> shippers,
which read the journal and report through the links.
"""

from .commit import Done, GroupError, apply_to_volumes, received_records, volume_of, wake_all
from .core import Group
from .links import Links, TargetLink

__all__ = ["Done", "Group", "GroupError", "Links", "TargetLink", "apply_to_volumes",
           "received_records", "volume_of", "wake_all"]
