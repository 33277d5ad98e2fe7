"""A group's checkpoint: `group.json`, the seq its volumes hold durably, with what the
group must remember across a restart (targets' positions and states, lineage, role
set at runtime, a resync in progress).

A checkpoint makes the volumes durable (fdatasync) first, then replaces group.json
over its spare copy (statefile.py: atomic, durable, no fresh space needed on a full
disk), so group.json never names a seq the volumes might not hold. Saves run in the
checkpointer's thread and in the group's io worker: one at a time.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Callable

from .. import statefile
from ..journal.segments import Position
from .commit import GroupError


class Checkpoint:
    def __init__(self, name: str, directory: str):
        self.name = name
        self.path = os.path.join(directory, "group.json")
        self.position = Position(0, 0)  # what the volumes held at the last save
        self.saved_acked: dict = {}  # the targets' acked seqs it recorded
        self.changed = False  # group.json misses something besides positions
        self._lock = threading.Lock()

    def read(self) -> dict:
        """The saved state ({} when there is none yet); sets `position`."""
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as exc:
            raise GroupError(f"group {self.name}: cannot read {self.path}: {exc}") from None
        self.position = Position(*state.get("checkpoint", (0, 0)))
        return state

    def save(self, volumes, pos: Position, acked: dict, state: Callable[[dict], dict]) -> None:
        """Make `volumes` durable, then record `pos` and `state(acked)` (read after
        `changed` is cleared, so a change made meanwhile is saved again next time)."""
        with self._lock:
            for vol in volumes:
                vol.sync()
            self.changed = False
            data = {"checkpoint": [pos.seq, pos.hcrc], **state(acked)}
            statefile.replace(self.path, json.dumps(data).encode(), pad=True)
            self.position = pos
            self.saved_acked = acked
