"""The memtable (writes completed, not applied to the volume yet) against a model: a
read through it always equals the volume with every held write applied in seq order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.group.memtable import GRAIN, Memtable

SIZE = 4 * GRAIN

_write = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 2 * GRAIN),
                   st.booleans(), st.integers(1, 255))
_batches = st.lists(st.lists(_write, min_size=1, max_size=5), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(_batches, st.integers(0, 12), st.data())
def test_reads_see_the_volume_with_the_held_writes_in_seq_order(batches, applied, data):
    volume = bytearray(SIZE)  # what the volume holds: the batches applied so far
    expected = bytearray(SIZE)  # what a read must see: every batch
    table = Memtable()
    seq = 0
    done = []
    for batch in batches:
        records = []
        for offset, length, zero, fill in batch:
            length = min(length, SIZE - offset)
            seq += 1
            payload = None if zero else bytes([fill]) * length
            records.append((seq, "v", offset, length, payload))
            expected[offset:offset + length] = payload or bytes(length)
        table.add(seq, records)
        done.append((seq, records))
    # The first `applied` batches reach the volume and leave the table.
    for last, records in done[:applied]:
        for _, _, offset, length, payload in records:
            volume[offset:offset + length] = payload or bytes(length)
        table.drop_through(last)
    for _ in range(5):
        offset = data.draw(st.integers(0, SIZE - 1))
        length = data.draw(st.integers(1, SIZE - offset))
        got = table.overlay("v", offset, bytes(volume[offset:offset + length]))
        assert got == bytes(expected[offset:offset + length])
    assert table.overlay("other", 0, b"x") == b"x"  # another volume's writes never show
    table.drop_through(seq)
    assert not table and table.nbytes == 0


def test_bytes_held_count_each_write_once():
    table = Memtable()
    table.add(1, [(1, "v", GRAIN - 10, 3 * GRAIN, b"a" * 3 * GRAIN)])  # spans 4 blocks
    table.add(2, [(2, "v", 0, 100, None)])  # zeroes hold no payload
    assert table.nbytes == 3 * GRAIN
    table.drop_through(1)
    assert table.nbytes == 0 and table
    table.drop_through(2)
    assert not table
