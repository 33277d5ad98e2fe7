"""Drill workload blocks: self-describing encoding and the write order."""

import pytest

from replicator.drill import block

RUN = bytes(range(16))
OTHER_RUN = bytes(range(16, 32))


@pytest.mark.parametrize("size", [512, 4096, 65536])
def test_encode_decode_round_trip(size):
    data = block.encode(RUN, 12, 5 * size, size)
    assert len(data) == size
    assert data.startswith(block.MAGIC)
    assert block.decode(data) == block.BlockId(RUN, 12, 5 * size)


def test_content_is_deterministic_and_unique_per_run_and_index():
    a = block.encode(RUN, 3, 8192, 4096)
    assert block.encode(RUN, 3, 8192, 4096) == a
    assert block.encode(RUN, 4, 8192, 4096) != a
    assert block.encode(OTHER_RUN, 3, 8192, 4096) != a
    assert block.encode(RUN, 3, 8192, 4096)[48:] != block.encode(RUN, 4, 8192, 4096)[48:]


@pytest.mark.parametrize("position", [0, 9, 30, 45, 48, 2000, 4095])
def test_any_corrupted_byte_is_detected(position):
    data = bytearray(block.encode(RUN, 7, 4096, 4096))
    data[position] ^= 0x01
    assert block.decode(bytes(data)) is None


def test_decode_rejects_what_is_not_a_drill_block():
    assert block.decode(bytes(4096)) is None
    assert block.decode(b"short") is None
    data = block.encode(RUN, 1, 0, 4096)
    assert block.decode(data[:512]) is None          # a torn (partial) block
    assert block.decode(data + bytes(512)) is None   # size disagrees with the header


def test_digest_is_of_the_whole_block():
    data = block.encode(RUN, 1, 0, 4096)
    assert len(block.digest(data)) == 32
    assert block.digest(data) != block.digest(data[:-1] + b"\x00")


@pytest.mark.parametrize("size", [0, 100, 511, 1000, -512])
def test_block_size_must_be_a_multiple_of_512(size):
    with pytest.raises(ValueError):
        block.encode(RUN, 0, 0, size)


def test_run_id_must_be_16_bytes():
    with pytest.raises(ValueError):
        block.encode(b"short", 0, 0, 4096)


@pytest.mark.parametrize("nblocks", [1, 2, 3, 7, 64, 1000, 4096])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_shuffled_order_is_a_permutation(nblocks, seed):
    order = block.Order.shuffled(nblocks, seed)
    assert sorted(order.block(i) for i in range(nblocks)) == list(range(nblocks))


def test_shuffled_order_depends_on_the_seed_only():
    a = block.Order.shuffled(4096, 5)
    assert a == block.Order.shuffled(4096, 5)
    assert a != block.Order.shuffled(4096, 6)
    assert [a.block(i) for i in range(10)] != list(range(10))


def test_sequential_order():
    order = block.Order.sequential(10)
    assert [order.block(i) for i in range(10)] == list(range(10))


def test_order_refuses_what_is_not_a_permutation():
    with pytest.raises(ValueError):
        block.Order(10, 4, 0)     # 4 and 10 share a factor: not every block is reached
    with pytest.raises(ValueError):
        block.Order(10, 3, 10)
    with pytest.raises(ValueError):
        block.Order(0)
    with pytest.raises(IndexError):
        block.Order(10).block(10)
