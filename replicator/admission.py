"""Admission: who may replicate what with this node, judged on a sender's HELLO.

The receiver asks; this module answers with a `Refused` (code and reason, for REFUSE and
the log) or None. It applies the lineage rules of generations.py to this node's role in
a group, so it lives beside them rather than in the receiver's connection handling.
The rules, checked in this order:
- connect at all (`admit`): a node of `peers`, whose TLS certificate names the node its
  HELLO claims (plain TCP: the claim alone, so keep plain TCP to trusted networks), at a
  protocol version both speak, addressed to this node, for a group this node has;
- members of a group, as this node knows them (`members`): its source and targets, as
  configured and as operator acts changed them (promote, demote, reparent, attach,
  resolve), its bunker, its configured `members`, and the successor its source named;
- read the journal, FETCH (`may_fetch`): members only (NOT_MEMBER);
- be judged by generation history (`judge`: split brain, stale, which it records in the
  group's lineage): members only; anyone else is refused by role and source without its
  history counting;
- ship records (`judge`): only the group's source, or the successor its source named
  in-band (SUCCESSOR, `name_successor`, during a switchover) once that node connects as
  the primary of a generation that begins right after the named seq. A newer generation
  claimed by a peer changes neither this node's role nor its source: a primary stays
  primary (an old primary back after a takeover is demoted by the operator, `replicator
  demote`), and a replica whose source was lost is re-pointed by the operator
  (`replicator reparent`).

State: the successors named in-band (group -> (node, seq)), changed only through
`name_successor` and `source_connected`.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from .generations import Relation, Verdict, compare, from_wire, to_wire
from .group import Group
from .wire import PROTOCOL_MAX, PROTOCOL_MIN, Hello, Refusal, Successor, Welcome


class Refused(NamedTuple):
    """Why a sender may not do what its HELLO asks: the REFUSE code and its reason."""
    code: Refusal
    reason: str


def welcome(group: Group, node: str, agreed) -> Welcome:
    """The WELCOME of an admitted HELLO: the agreed (version, features) and the group's
    durable position (its last epoch boundary: records of an epoch that does not close
    yet are sent again, and skipped) and history here. The caller settles the group's
    commits first."""
    pos = group.journal.position(group.commit.consistent_seq)
    version, features = agreed
    return Welcome(version=version, features=features, seq=pos.seq, crc=pos.hcrc, node=node,
                   history=to_wire(group.lineage.history))


class Admission:
    """The admission policy of one node (see the module docstring)."""

    def __init__(self, node: str, peers, *, tls: bool, log: logging.Logger):
        self.node = node
        self.peers = set(peers)  # the address book: nobody else may connect
        self.tls = tls
        self.log = log
        # group -> (node, seq): the successor our source named (SUCCESSOR), until it connects
        self._successors: dict[str, tuple[str, int]] = {}

    def members(self, group: Group) -> set[str]:
        """The nodes this node knows as members of `group`."""
        cfg = group.cfg
        nodes = {cfg.source, group.source, cfg.bunker, group.lineage.survivor, *cfg.members}
        nodes.update(t.node for t in cfg.targets)
        nodes.update(t.node for t in group.target_cfgs)
        named = self._successors.get(group.name)
        if named is not None:
            nodes.add(named[0])
        nodes.discard(None)
        nodes.discard(self.node)
        return nodes

    def admit(self, hello: Hello, group: Group | None, agreed,
              cert_node: str | None) -> Refused | None:
        """A refusal when the sender may not talk to this node about this group at all
        (`agreed` is what negotiate() made of the HELLO, `cert_node` the node its TLS
        certificate names)."""
        if self.tls and cert_node != hello.node:
            return Refused(Refusal.IDENTITY, f"HELLO says node {hello.node!r} but its TLS "
                                             f"certificate is for {cert_node!r}")
        if hello.node not in self.peers:
            return Refused(Refusal.UNKNOWN_PEER,
                           f"{hello.node!r} is not in the peers of {self.node}")
        if agreed is None:
            older = hello.node if hello.proto_max < PROTOCOL_MIN else self.node
            return Refused(Refusal.VERSION,
                           f"{hello.node!r} speaks replication protocol {hello.proto_min}.."
                           f"{hello.proto_max}, {self.node!r} speaks {PROTOCOL_MIN}.."
                           f"{PROTOCOL_MAX}: upgrade {older!r}")
        if hello.target != self.node:
            return Refused(Refusal.WRONG_TARGET,
                           f"this is node {self.node!r}, not {hello.target!r}")
        if group is None:
            return Refused(Refusal.UNKNOWN_GROUP, f"no group {hello.group!r} on node {self.node}")
        return None

    def may_fetch(self, hello: Hello, group: Group) -> Refused | None:
        """A refusal when an admitted sender may not read this group's journal."""
        members = self.members(group)
        if hello.node in members:
            return None
        return Refused(Refusal.NOT_MEMBER,
                       f"{hello.node!r} is not a member of group {group.name} on {self.node}, "
                       f"so it may not read its journal (members: {', '.join(sorted(members))})")

    def verdict(self, hello: Hello, group: Group) -> Verdict:
        """What the generation histories say of the sender shipping to this group here;
        a split brain with the survivor `resolve --discard-local` chose is a divergence
        (our records past the fork are rolled back)."""
        verdict = compare(from_wire(hello.history), hello.seq, group.lineage.history,
                          group.journal.last_seq)
        if verdict.relation == Relation.SPLIT_BRAIN and group.lineage.survivor == hello.node:
            return Verdict(Relation.DIVERGED, verdict.fork)
        return verdict

    def judge(self, hello: Hello, group: Group, verdict: Verdict) -> Refused | None:
        """A refusal when an admitted sender may not ship to this group: by lineage
        (members only: the split brain it finds is recorded), then by role and source."""
        member = hello.node in self.members(group)
        return (self._lineage(hello, group, verdict) if member else None) \
            or self._role(hello, group, verdict)

    def source_connected(self, group: Group) -> None:
        """The group's sender was admitted: a successor named before is taken as source
        now, or superseded."""
        self._successors.pop(group.name, None)

    def name_successor(self, group: Group, ev: Successor) -> str | None:
        """Our source names the next primary (SUCCESSOR); why not, or None once it is
        recorded. The caller settles the group's commits first."""
        if ev.node not in self.peers or ev.node == self.node:
            return f"successor {ev.node!r} is not one of the peers of {self.node}"
        if group.journal.last_seq != ev.seq:
            return (f"successor {ev.node} named at seq {ev.seq} but group {group.name} on "
                    f"{self.node} holds seq {group.journal.last_seq}")
        self._successors[group.name] = (ev.node, ev.seq)
        return None

    def _named(self, hello: Hello, group: Group) -> bool:
        """Whether `hello.node` is the successor our source named, connecting as the
        primary of exactly the generation the switchover began: our line plus one
        generation starting right after the named seq, which we hold as our last record."""
        named = self._successors.get(group.name)
        if named is None or named[0] != hello.node:
            return False
        history = from_wire(hello.history)
        return (group.journal.last_seq == named[1] and history[:-1] == group.lineage.history
                and len(history) == len(group.lineage.history) + 1
                and history[-1].first_seq == named[1] + 1)

    def _lineage(self, hello: Hello, group: Group, verdict: Verdict) -> Refused | None:
        """A refusal when the generation histories say the sender may not ship here."""
        if verdict.relation == Relation.SPLIT_BRAIN:
            group.lineage.diverged(hello.node, fork=verdict.fork)
            self.log.error("group %s: SPLIT BRAIN with %s: both were primary after seq %d; "
                           "choose the survivor (replicator resolve on the other)",
                           group.name, hello.node, verdict.fork)
            return Refused(Refusal.SPLIT_BRAIN,
                           f"split brain: {hello.node} and {self.node} were both primary of "
                           f"{group.name} after seq {verdict.fork}")
        if verdict.relation == Relation.STALE:
            return Refused(Refusal.STALE,
                           f"{self.node} descends from a later primary of {group.name} than "
                           f"{hello.node} (forked after seq {verdict.fork}): {hello.node} is "
                           "no longer the primary; demote it")
        return None

    def _role(self, hello: Hello, group: Group, verdict: Verdict) -> Refused | None:
        """A refusal when this node's role in the group does not take `hello.node` as
        source: a replica takes its source (or the successor its source named), nobody
        else; a later generation is no authority."""
        later = verdict.relation in (Relation.BEHIND, Relation.DIVERGED)
        if group.role not in ("secondary", "bunker"):
            why = f"group {hello.group} is {group.role} on {self.node}"
            if later:
                why += (f"; {hello.node} claims a later generation: if it took over, make this "
                        f"node its replica with `replicator demote {hello.group} --source "
                        f"{hello.node}`")
            return Refused(Refusal.NOT_REPLICA, why)
        if hello.node != group.source and not self._named(hello, group):
            why = (f"group {hello.group} on {self.node} takes records from {group.source!r}, "
                   f"not {hello.node!r}")
            if later:
                why += (f"; a later generation is no authority: if {hello.node} took over, run "
                        f"`replicator reparent {hello.group} --source {hello.node}` here")
            return Refused(Refusal.WRONG_SOURCE, why)
        return None
