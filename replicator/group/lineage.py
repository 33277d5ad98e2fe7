"""A group's lineage on this node: the generations its image descends from (each
promotion starts one; generations.py decides behind / diverged / split brain from
them), a split brain while a peer diverged, and what a rollback onto another line
saved of the writes it undid."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Callable

from .. import statefile
from ..events import emit
from ..generations import Generation, from_json, new_generation, to_json
from ..journal.record import CHANGING
from ..journal.segments import Journal
from ..volume import Volume


class Lineage:
    def __init__(self, name: str, directory: str, journal: Journal, volumes: dict[str, Volume],
                 log: logging.Logger, *, changed: Callable[[], None]):
        self.name = name
        self.dir = directory
        self.journal = journal
        self.volumes = volumes
        self.log = log
        self._changed = changed  # group.json must be saved again
        self.history: list[Generation] = []  # generations this image descends from
        self.split_brain: dict | None = None  # {peer, fork, ...} while a peer diverged
        self.survivor: str | None = None  # resolve --discard-local: the peer whose line wins
        self.discarded: list[str] = []  # where rolled-back divergent data was saved

    def load(self, state: dict) -> None:
        self.history = from_json(state.get("generations"))
        self.discarded = list(state.get("discarded", []))

    def state(self) -> dict:
        return {"generations": to_json(self.history), "discarded": self.discarded}

    def diverged(self, peer: str, **why) -> None:
        """`peer`'s line and ours diverged (split brain): `why` says how (fork, reason)."""
        if self.split_brain is None or self.split_brain.get("peer") != peer:
            emit("split_brain", self.name, peer, **why)
        self.split_brain = {"peer": peer, **why}

    def reconciled(self, peer: str) -> None:
        """`peer` connected and agrees with our line: no split brain with it."""
        if self.split_brain and self.split_brain.get("peer") == peer:
            self.split_brain = None

    def begin(self, first_seq: int) -> Generation:
        """This node becomes primary: a new generation starts at `first_seq`."""
        gen = new_generation(first_seq)
        self.history.append(gen)
        return gen

    def adopt(self, history: list[Generation]) -> bool:
        """Take a source's history (this image descends from it, or is rolled back
        onto it); True when that changed anything."""
        self.split_brain = None  # now of the sender's line: what diverged is rolled back
        if history == self.history:
            return False
        self.history = list(history)
        return True

    def save_diverged(self, fork: int, extents: list[tuple[str, int, int]] | None) -> str:
        """Before a resync rolls back this node's records after `fork`, keep what they
        wrote: the content of `extents` (or, when they are not all known, a copy of every
        volume) under the group's state directory. Returns the path."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        base = os.path.join(self.dir, f"diverged-{fork}-{stamp}")
        os.makedirs(base, exist_ok=True)
        if extents is None:
            for vol in self.volumes.values():
                copy = os.path.join(base, f"{vol.name}.img")
                shutil.copyfile(vol.path, copy)
                with open(copy, "rb") as f:
                    os.fsync(f.fileno())
            index = {"fork": fork, "complete": False, "volumes": sorted(self.volumes)}
        else:
            with open(os.path.join(base, "regions.bin"), "wb") as f:
                for volume, offset, length in extents:
                    f.write(self.volumes[volume].read(offset, length))
                f.flush()
                os.fsync(f.fileno())  # durable before the resync overwrites the regions
            index = {"fork": fork, "complete": True,
                     "regions": [{"volume": v, "offset": o, "length": n} for v, o, n in extents]}
        with open(os.path.join(base, "index.json"), "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for d in (base, self.dir):  # the new names too
            statefile.fsync_dir(d)
        self.discarded.append(base)
        self._changed()
        self.log.warning("group %s: data written here after seq %d is rolled back; kept in %s",
                         self.name, fork, base)
        return base

    def diverged_extents(self, fork: int) -> tuple[bool, list[tuple[str, int, int]]]:
        """The regions written by this node's records after `fork`: (complete, extents);
        not complete when the journal no longer holds all of them."""
        j = self.journal
        complete = fork + 1 >= j.first_seq
        extents = [(r.volume, r.offset, r.length) for r in j.records(max(fork, j.base.seq))
                   if r.kind in CHANGING]
        return complete, extents
