"""Generation histories: which way data may flow between two nodes, and where they forked."""

import pytest

from replicator.generations import (Generation, Relation, compare, from_json, new_generation,
                                    to_json)

G1, G2, G3 = Generation(1, 1), Generation(2, 101), Generation(3, 151)


@pytest.mark.parametrize("sender,sseq,receiver,rseq,relation,fork", [
    ([G1], 50, [], 0, Relation.NEW, 0),
    ([G1], 50, [G1], 30, Relation.SAME, 30),
    # the receiver is an older line: promoted node G2 ships to a replica of G1
    ([G1, G2], 120, [G1], 100, Relation.BEHIND, 100),
    ([G1, G2], 120, [G1], 90, Relation.BEHIND, 100),
    # ... that holds records past the fork (old primary back, or a replica ahead of
    # the one promoted): rolled back
    ([G1, G2], 120, [G1], 105, Relation.DIVERGED, 100),
    # an old primary that did not write after the promotion is stale...
    ([G1], 100, [G1, G2], 120, Relation.STALE, 100),
    # ...and one that did is a split brain
    ([G1], 104, [G1, G2], 120, Relation.SPLIT_BRAIN, 100),
    # both promoted after parting
    ([G1, G3], 160, [G1, G2], 120, Relation.SPLIT_BRAIN, 100),
    ([G2], 5, [G3], 5, Relation.SPLIT_BRAIN, 0),
])
def test_compare(sender, sseq, receiver, rseq, relation, fork):
    v = compare(sender, sseq, receiver, rseq)
    assert (v.relation, v.fork) == (relation, fork)


def test_json_round_trip_and_fresh_ids():
    h = [G1, new_generation(7)]
    assert from_json(to_json(h)) == h and h[1].first_seq == 7
    assert new_generation(1) != new_generation(1)
