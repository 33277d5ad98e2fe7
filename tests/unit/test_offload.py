"""Processing offload (seed 000) piece by piece: the processed form of records and its
restoration (codec.py), the relay of runs for a far target (relay.py), and the two ends
in a receiver session against real groups (image.py, session.py). The integration
tests (tests/integration/test_offload.py) run the same with real agents."""

from __future__ import annotations

import asyncio
import logging
import random
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.config import TargetConfig, parse
from replicator.group import Group
from replicator.journal.record import FLAG_OPEN, Kind, encode_header
from replicator.offload.codec import (KEY_SIZE, BaseMismatch, Op, ProcessedError, Processor,
                                      Restorer, load_key, ops_of, raw_run)
from replicator.offload.image import Image
from replicator.offload.relay import Relay
from replicator.offload.session import Processing, Restoring
from replicator.wire import Offload, Processed

KEY = bytes(range(KEY_SIZE))
OTHER_KEY = bytes(KEY_SIZE)


def write(seq: int, data: bytes, offset: int = 0, volume: bytes = b"data", flags: int = 0):
    return encode_header(seq, volume, offset, len(data), Kind.WRITE, seq, data, flags) + data


def zero(seq: int, offset: int, length: int, volume: bytes = b"data"):
    return encode_header(seq, volume, offset, length, Kind.ZERO, seq, b"")


def skip(seq: int, volume: bytes = b"data"):
    return encode_header(seq, volume, 0, 0, Kind.SKIP, seq, b"", FLAG_OPEN)


def process_run(proc: Processor, journal: bytes, base_of) -> bytes:
    """The processed run of the journal bytes `journal`, each write against base_of(rec)."""
    parts = []
    for rec, head in raw_run(journal):
        parts.extend(proc.process(head, rec, base_of(rec) if rec.kind is Kind.WRITE else None))
    return b"".join(parts)


def restore_run(restorer: Restorer, run: bytes, base_of) -> list[bytes]:
    """The journal bytes of every record of `run`, one item per record."""
    out, pos = [], 0
    while pos < len(run):
        _, bufs, pos = restorer.restore(run, pos, base_of)
        out.append(b"".join(bytes(b) for b in bufs))
    return out


def records_of(journal: bytes) -> list[bytes]:
    """The journal bytes of each record."""
    out, pos = [], 0
    for rec, _ in raw_run(journal):
        out.append(journal[pos:pos + rec.size])
        pos += rec.size
    return out


# ---- codec.py --------------------------------------------------------------------------

OP_SETS = st.sets(st.sampled_from(list(Op)), min_size=1).map(
    lambda ops: Op(sum(int(op) for op in ops)))


@st.composite
def base_and_payload(draw, max_size=64 << 10):
    """A base and a write of the same length: zeroes, random, equal, or a page with a
    few random bytes changed (what a database write mostly is)."""
    n = draw(st.one_of(st.integers(0, 80), st.integers(0, max_size)))
    rng = random.Random(draw(st.integers(0, 2**32)))
    base = draw(st.sampled_from(["zero", "random"]))
    base = bytes(n) if base == "zero" else rng.randbytes(n)
    kind = draw(st.sampled_from(["random", "zero", "equal", "mostly"]))
    if kind == "random":
        payload = rng.randbytes(n)
    elif kind == "zero":
        payload = bytes(n)
    elif kind == "equal":
        payload = base
    else:
        changed = bytearray(base)
        for _ in range(min(n, 64)):
            changed[rng.randrange(n)] = rng.randrange(256)
        payload = bytes(changed)
    return base, payload


def journal_with(payload: bytes, offset: int = 4096) -> bytes:
    """A write among a ZERO and a SKIP (records without a payload)."""
    return zero(7, 0, 1 << 20) + write(8, payload, offset) + skip(9) + write(10, payload[:1])


def bases_for(base: bytes):
    return lambda rec: base if rec.seq == 8 else bytes(rec.length)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_and_payload(), OP_SETS, st.booleans())
def test_processed_records_restore_byte_for_byte(pair, ops, with_key):
    base, payload = pair
    journal = journal_with(payload)
    key = KEY if with_key or ops & Op.ENCRYPT else None
    run = process_run(Processor(ops, key), journal, bases_for(base))
    assert restore_run(Restorer(key), run, bases_for(base)) == records_of(journal)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_and_payload(), OP_SETS, st.integers(0, 2**32))
def test_another_base_is_a_mismatch_and_never_a_wrong_payload(pair, ops, seed):
    base, payload = pair
    other = bytearray(base)
    if not other:
        return  # an empty base has no other
    other[random.Random(seed).randrange(len(other))] ^= 1 << (seed % 8)
    journal = journal_with(payload)
    run = process_run(Processor(ops, KEY), journal, bases_for(base))
    try:
        restored = restore_run(Restorer(KEY), run, bases_for(bytes(other)))
    except BaseMismatch as exc:
        assert exc.record.seq == 8
    else:
        assert not ops & Op.CHECKSUM, "a base checksum must catch another base"
        assert restored == records_of(journal)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_and_payload(max_size=2048), OP_SETS, st.data())
def test_a_flipped_bit_never_restores_another_record(pair, ops, data):
    """DESIGN.md invariant 3: whatever bit of a processed run flips, what is restored is
    the original or nothing (the error names corruption or a base mismatch)."""
    base, payload = pair
    journal = journal_with(payload)
    run = bytearray(process_run(Processor(ops, KEY), journal, bases_for(base)))
    bit = data.draw(st.integers(0, len(run) * 8 - 1))
    run[bit // 8] ^= 1 << (bit % 8)
    try:
        restored = restore_run(Restorer(KEY), bytes(run), bases_for(base))
    except (ProcessedError, BaseMismatch):
        return
    assert restored == records_of(journal)


@settings(max_examples=100, deadline=None)
@given(base_and_payload(max_size=2048), OP_SETS, st.data())
def test_a_run_cut_inside_a_record_is_corrupt(pair, ops, data):
    base, payload = pair
    journal = journal_with(payload)
    proc = Processor(ops, KEY)
    ends, run = set(), b""
    for rec, head in raw_run(journal):
        run += b"".join(proc.process(head, rec, bases_for(base)(rec)
                                     if rec.kind is Kind.WRITE else None))
        ends.add(len(run))
    cut = data.draw(st.integers(1, len(run) - 1).filter(lambda n: n not in ends))
    with pytest.raises(ProcessedError):
        restore_run(Restorer(KEY), run[:cut], bases_for(base))


@pytest.mark.parametrize("ops", [Op.ENCRYPT, Op.ENCRYPT | Op.DELTA | Op.ZSTD | Op.CHECKSUM])
@pytest.mark.parametrize("key", [OTHER_KEY, None])
def test_encrypted_records_need_the_same_key(ops, key):
    page = random.Random(1).randbytes(4096)
    journal = journal_with(page)
    run = process_run(Processor(ops, KEY), journal, bases_for(page))
    assert page not in run and page[:64] not in run
    with pytest.raises(ProcessedError, match="does not decrypt" if key else "no key"):
        restore_run(Restorer(key), run, bases_for(page))


def test_encrypt_needs_a_key():
    with pytest.raises(ValueError, match="encrypt needs the far link's key"):
        Processor(Op.ENCRYPT)


def test_a_page_with_a_few_bytes_changed_shrinks_tenfold():
    rng = random.Random(17)
    page = rng.randbytes(4096)
    changed = bytearray(page)
    for i in rng.sample(range(4096), 64):
        changed[i] = page[i] ^ rng.randrange(1, 256)
    journal = write(1, bytes(changed))
    run = process_run(Processor(Op.DELTA | Op.ZSTD), journal, lambda rec: page)
    assert len(run) * 10 <= len(page), len(run)
    assert restore_run(Restorer(), run, lambda rec: page) == [journal]


def test_steps_that_do_not_shrink_are_left_out():
    rng = random.Random(3)
    base, payload = rng.randbytes(4096), rng.randbytes(4096)
    run = process_run(Processor(Op.DELTA | Op.ZSTD | Op.CHECKSUM), write(1, payload),
                      lambda rec: base)
    (rec, head), = raw_run(write(1, payload))
    ops = run[rec.size - rec.length]
    assert ops == Op.DELTA | Op.CHECKSUM  # zstd of random bytes would grow


def test_ops_of_names():
    assert ops_of(["delta", "zstd"]) == Op.DELTA | Op.ZSTD and ops_of([]) == Op(0)


def test_load_key(tmp_path):
    good = tmp_path / "good.key"
    good.write_text("\n  " + KEY.hex() + "\n")
    assert load_key(str(good)) == KEY
    for name, text in [("short", KEY.hex()[:-2]), ("long", KEY.hex() + "00"),
                       ("nonhex", "zz" * KEY_SIZE), ("empty", "")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=f"link key {path} must hold 64 hex digits"):
            load_key(str(path))
    missing = tmp_path / "missing.key"
    with pytest.raises(ValueError, match=f"cannot read link key {missing}"):
        load_key(str(missing))
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=f"cannot read link key {binary}"):
        load_key(str(binary))


# ---- relay.py --------------------------------------------------------------------------

FAR = TargetConfig(node="far", mode="async", via="near", process=("delta", "zstd"))


def test_relay_keeps_runs_in_order_until_taken_or_dropped():
    relay = Relay(FAR, via="near", limit=100)
    relay.add(5, 7, b"a" * 10)
    relay.add(8, 8, b"b" * 20)
    relay.add(12, 15, b"c" * 30)
    assert relay.nbytes == 60 and relay.last_of(8) == 8 and relay.last_of(12) == 15
    assert relay.next_start(4) == 5 and relay.next_start(5) == 8 and relay.next_start(9) == 12
    assert relay.next_start(12) is None
    assert relay.take(6) is None and relay.nbytes == 60
    assert relay.take(8) == (8, b"b" * 20) and relay.nbytes == 40
    relay.add(8, 8, b"b" * 20)  # resent after a reconnection: we are past it
    relay.add(15, 16, b"d")  # begins inside what we hold
    assert relay.next_start(9) == 12 and relay.nbytes == 40
    relay.drop_through(12)  # the far target holds 12: the run from 12 goes too
    assert relay.next_start(0) is None and relay.nbytes == 0
    relay.add(16, 20, b"e" * 60)
    relay.add(21, 21, b"f" * 41)  # over the limit: not kept
    assert relay.dropped == 1 and relay.next_start(16) is None and relay.nbytes == 60
    relay.add(21, 21, b"f" * 40)
    assert relay.nbytes == 100 and relay.next_start(16) == 21


def test_relay_wait_for():
    async def main():
        relay = Relay(FAR, via="near", wait=3600)
        relay.add(3, 4, b"x")
        async with asyncio.timeout(10):  # none of these may wait
            assert await relay.wait_for(3)  # there
            assert not await relay.wait_for(5)  # the near node is not processing
            relay.processing = True
            assert not await relay.wait_for(5)  # nor known
            relay.near = types.SimpleNamespace(written_seq=5)
            assert not await relay.wait_for(5)  # it has written 5: its run is not coming
            relay.near.written_seq = 4
            waiting = asyncio.create_task(relay.wait_for(5))
            await asyncio.sleep(0)
            assert not waiting.done()
            relay.add(5, 6, b"y")
            assert await waiting
        relay.wait = 0.05
        assert not await relay.wait_for(7)  # too late: gave up on it
        relay.wait = 3600
        async with asyncio.timeout(10):
            assert not await relay.wait_for(7)  # and no more waiting
            assert not await relay.wait_for(8)
            relay.add(7, 7, b"z")  # until the next run comes
            waiting = asyncio.create_task(relay.wait_for(8))
            await asyncio.sleep(0)
            assert not waiting.done()
            relay.add(8, 9, b"w")
            assert await waiting

    asyncio.run(main())


def test_relay_paths_counters_and_status():
    relay = Relay(FAR, via="near")
    assert relay.path == "direct" and relay.ops == Op.DELTA | Op.ZSTD
    relay.shipped(3, False, 300, 300)
    assert relay.path == "direct" and relay.path_changed == 0.0
    relay.shipped(10, True, 100, 4000)
    relay.shipped(5, True, 50, 2000)
    assert relay.path == "via near" and relay.path_changed > 0
    assert (relay.records_processed, relay.records_direct, relay.bytes_processed,
            relay.bytes_raw) == (15, 3, 150, 6000)
    here = Relay(FAR)
    here.shipped(1, True, 10, 20)
    assert here.path == "processed here"
    relay.mismatched(12, "data", 4096, 512)
    status = relay.status()
    assert status == {
        "via": "near", "process": ["delta", "zstd"], "path": "via near",
        "processing": False, "refused": None, "records_processed": 15,
        "records_direct": 3, "bytes_processed": 150, "bytes_raw": 6000, "held_bytes": 0,
        "dropped_runs": 0, "base_mismatches": 1,
        "last_mismatch": {"seq": 12, "volume": "data", "offset": 4096, "length": 512,
                          "time": status["last_mismatch"]["time"]}}
