"""Generations: the lineage of a group's primaries, and what two nodes' lineages say
about which way data may flow between them.

Each time a node becomes primary for a group it starts a new generation: a random
64-bit id and the first seq written in it. A node keeps the list of generations its
image descends from (its history). Two nodes compare histories when they connect
(HELLO carries the sender's, WELCOME the receiver's), like DRBD's generation UUIDs:

- the receiver's history is a prefix of the sender's: it is behind (BEHIND), unless it
  holds records of an older generation past the point where the sender's next one
  began; those never reached the sender's line and are rolled back (DIVERGED: the old
  primary of a takeover returning, or a replica that had more than the promoted one);
- the sender's history is a strict prefix of the receiver's: the receiver was promoted
  after the sender's line; the sender is a STALE primary and must not ship (if it wrote
  past that point it is a split brain);
- neither is a prefix of the other: both were primary after they parted (SPLIT_BRAIN).

`fork` is the last seq both lines share.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Generation:
    id: int
    first_seq: int

    def __str__(self) -> str:
        return f"{self.id:016x}@{self.first_seq}"


def new_generation(first_seq: int) -> Generation:
    return Generation(int.from_bytes(os.urandom(8), "little"), first_seq)


class Relation(enum.Enum):
    NEW = "new"  # the receiver has no history yet
    SAME = "same"  # same lineage: positions decide (stream, resync, or diverged records)
    BEHIND = "behind"  # the receiver's lineage is older; it has nothing past the fork
    DIVERGED = "diverged"  # ...but holds records past the fork: roll them back
    STALE = "stale"  # the sender's lineage is older than the receiver's
    SPLIT_BRAIN = "split-brain"


@dataclass(frozen=True)
class Verdict:
    relation: Relation
    fork: int  # last seq both lines share (meaningful for every relation but NEW/SAME)


def compare(sender: list[Generation], sender_seq: int, receiver: list[Generation],
            receiver_seq: int) -> Verdict:
    """How data may flow from a sender (history, last seq) to a receiver."""
    if not receiver:
        return Verdict(Relation.NEW, 0)
    common = 0
    for a, b in zip(sender, receiver):
        if a != b:
            break
        common += 1
    if common == len(sender) == len(receiver):
        return Verdict(Relation.SAME, min(sender_seq, receiver_seq))
    if common == len(receiver):  # the sender's line went on after the receiver's
        fork = sender[common].first_seq - 1
        return Verdict(Relation.DIVERGED if receiver_seq > fork else Relation.BEHIND, fork)
    if common == len(sender):  # the receiver's line went on: the sender is old
        fork = receiver[common].first_seq - 1
        return Verdict(Relation.SPLIT_BRAIN if sender_seq > fork else Relation.STALE, fork)
    firsts = [h[common].first_seq for h in (sender, receiver) if common < len(h)]
    return Verdict(Relation.SPLIT_BRAIN, min(firsts) - 1 if common else 0)


def to_json(history: list[Generation]) -> list:
    return [[f"{g.id:016x}", g.first_seq] for g in history]


def from_json(value) -> list[Generation]:
    return [Generation(int(i, 16), int(s)) for i, s in value or []]


def to_wire(history: list[Generation]) -> tuple:
    """A history as HELLO and WELCOME carry it: ((id, first_seq), ...)."""
    return tuple((g.id, g.first_seq) for g in history)


def from_wire(pairs) -> list[Generation]:
    """The history a HELLO or WELCOME carried."""
    return [Generation(*g) for g in pairs]
