"""Processing offload (seed 000) piece by piece: the processed form of records and its
restoration (codec.py), the relay of runs for a far target (relay.py), and the two ends
in a receiver session against real groups (image.py, session.py). The integration
tests (tests/integration/test_offload.py) run the same with real agents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import types

import pytest
import zstandard
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


def zero(seq: int, offset: int, length: int, volume: bytes = b"data", flags: int = 0):
    return encode_header(seq, volume, offset, length, Kind.ZERO, seq, b"", flags)


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


def zstd_claiming(declared: int, n: int) -> bytes:
    """A zstd frame that declares `declared` bytes of content and holds one block of n
    zero bytes (RLE)."""
    block = 1 | 1 << 1 | n << 3  # last block, RLE, n bytes
    return struct.pack("<IBQ", 0xFD2FB528, 0xE0, declared) + block.to_bytes(3, "little") + b"\0"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.integers(0, 15), st.integers(0, 2**64 - 1),
       st.none() | st.integers(0, 400), st.binary(max_size=400), st.booleans())
def test_any_body_under_a_good_head_restores_or_is_refused(length, ops, check, size, body,
                                                           zstd_head):
    """Whatever follows a record's head (a hostile peer's, or damage the head does not
    see): ProcessedError or BaseMismatch, never another exception nor another record."""
    payload = bytes(range(256)) * 2
    (rec, head), = raw_run(write(1, payload[:length]))
    if zstd_head:  # a frame header, so the bytes go as far as the decompressor
        body = zstandard.ZstdCompressor().compress(payload[:length])[:6] + body
    size = len(body) if size is None else size  # None: the size is right
    run = bytes(head) + struct.pack("<BQI", ops, check, size) + body
    try:
        got, bufs, _ = Restorer(KEY).restore(run, 0, lambda rec: bytes(rec.length))
    except (ProcessedError, BaseMismatch):
        return
    assert b"".join(bytes(b) for b in bufs) == write(1, payload[:length])


@pytest.mark.parametrize("ops", [Op.ZSTD, Op.ZSTD | Op.DELTA])
@pytest.mark.parametrize("declared", [1 << 40, 1 << 62, 4095])
def test_a_zstd_body_claiming_another_size_is_corrupt_and_never_allocated(ops, declared):
    """The one-shot decompressor allocates what a frame declares: a damaged size field
    must be refused before it is believed (1 TiB would be a MemoryError)."""
    (rec, head), = raw_run(write(1, bytes(4096)))
    body = zstd_claiming(declared, 4096)
    run = bytes(head) + struct.pack("<BQI", ops, 0, len(body)) + body
    with pytest.raises(ProcessedError, match=f"zstd body declares {declared} bytes for a "
                                             "write of 4096"):
        Restorer().restore(run, 0, lambda rec: bytes(4096))
    good = zstd_claiming(4096, 4096)  # the same frame, honest: restores
    run = bytes(head) + struct.pack("<BQI", ops, 0, len(good)) + good
    assert Restorer().restore(run, 0, lambda rec: bytes(4096))[0].payload == bytes(4096)


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
    (rec, _), = raw_run(write(1, payload))
    ops = run[rec.size - rec.length]  # the byte after the head
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
    assert relay.take(8, 20, 1000) == (8, [b"b" * 20]) and relay.nbytes == 40
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


def test_relay_hands_out_consecutive_runs_as_one_within_limits():
    relay = Relay(FAR, via="near", limit=1000)
    for first, size in ((1, 10), (3, 10), (5, 10), (6, 10)):
        relay.add(first, first + (1 if first < 5 else 0), bytes([first]) * size)
    # runs 1-2, 3-4, 5, 6: by seq, by bytes (the first whatever its size), stopping at a gap
    assert relay.take(1, 4, 1000) == (4, [b"\x01" * 10, b"\x03" * 10])
    assert relay.take(5, 100, 5) == (5, [b"\x05" * 10])
    assert relay.take(6, 100, 100) == (6, [b"\x06" * 10]) and relay.nbytes == 0
    relay.add(7, 8, b"x")
    relay.add(10, 10, b"y")  # 9 never came
    assert relay.take(7, 100, 100) == (8, [b"x"]) and relay.next_start(8) == 10


def test_relay_wait_for():
    async def main():
        relay = Relay(FAR, via="near", wait=3600)
        relay.add(3, 4, b"x")
        async with asyncio.timeout(10):  # none of these may wait
            assert await relay.wait_for(3)  # there
            assert not await relay.wait_for(5)  # the near node is not processing
            relay.processing = True
            relay.near = types.SimpleNamespace(in_sync=False)
            assert not await relay.wait_for(5)  # not in sync: it may be far behind
            relay.near.in_sync = True
            waiting = asyncio.create_task(relay.wait_for(5))
            await asyncio.sleep(0)
            assert not waiting.done()
            relay.add(5, 6, b"y")
            assert await waiting
            relay.add(8, 9, b"v")
            assert not await relay.wait_for(7)  # a run past it came: 7's never will
            waiting = asyncio.create_task(relay.wait_for(10))
            await asyncio.sleep(0)
            assert not waiting.done()
            relay.add(11, 11, b"u")  # past it, while it waits: stop waiting
            assert not await waiting
        relay.wait = 0.05
        assert not await relay.wait_for(12)  # too late: gave up on it
        relay.wait = 3600
        async with asyncio.timeout(10):
            assert not await relay.wait_for(12)  # and no more waiting
            assert not await relay.wait_for(13)
            relay.add(12, 12, b"z")  # until the next run comes
            waiting = asyncio.create_task(relay.wait_for(13))
            await asyncio.sleep(0)
            assert not waiting.done()
            relay.add(13, 14, b"w")
            assert await waiting

    asyncio.run(main())


def test_relay_says_why_records_go_direct():
    relay = Relay(FAR, via="near")
    assert relay.why_direct() == "near is not processing (away, resyncing or just connected)"
    relay.refused = "no volumes"
    assert relay.why_direct() == "near refused: no volumes"
    relay.processing, relay.refused = True, ""
    relay.near = types.SimpleNamespace(in_sync=False)
    assert relay.why_direct() == "near is not in sync"
    relay.near.in_sync = True
    assert relay.why_direct() == "near's processed records came too late or not at all"
    here = Relay(FAR)  # a cascade: this node's own receiver processes
    assert here.why_direct() == "this node is not processing (away, resyncing or just " \
        "connected)"
    here.processing = True
    assert here.why_direct() == "this node's receiver has not processed them (yet)"


def test_relay_paths_counters_and_status():
    relay = Relay(FAR, via="near")
    assert relay.path == "direct" and relay.ops == Op.DELTA | Op.ZSTD
    assert relay.shipped(3, False, 300, 300) is None  # the path it had
    assert relay.path == "direct" and relay.path_changed == 0.0
    assert relay.shipped(10, True, 100, 4000) == "via near"
    assert relay.shipped(5, True, 50, 2000) is None
    assert relay.path == "via near" and relay.path_changed > 0
    assert (relay.records_processed, relay.records_direct, relay.bytes_processed,
            relay.bytes_raw) == (15, 3, 150, 6000)
    here = Relay(FAR)
    assert here.shipped(1, True, 10, 20) == "processed here"
    relay.mismatched(12, "data", 4096, 512)
    status = relay.status()
    assert status == {
        "via": "near", "process": ["delta", "zstd"], "path": "via near",
        "processing": False, "refused": None, "records_processed": 15,
        "records_direct": 3, "bytes_processed": 150, "bytes_raw": 6000, "held_bytes": 0,
        "dropped_runs": 0, "base_mismatches": 1,
        "last_mismatch": {"seq": 12, "volume": "data", "offset": 4096, "length": 512,
                          "time": status["last_mismatch"]["time"]}}


# ---- image.py and session.py, with real groups ------------------------------------------

SIZE = 1 << 20
LOG = logging.getLogger("test_offload")


def replica(tmp_path, node: str, keys: dict | None = None, role: str = "secondary") -> Group:
    """A group `db` on `node`, a replica of `q` (`near` and `far` are its peers)."""
    peers = {name: f"127.0.0.1:{port}" for port, name in enumerate(("q", "near", "far"), 3)
             if name != node}
    paths = {}
    for far, key in (keys or {}).items():
        path = tmp_path / f"{node}-{far}.key"
        path.write_text(key.hex())
        paths[far] = str(path)
    volumes = [] if role == "bunker" else [
        {"name": "data", "path": str(tmp_path / f"{node}-data.img"), "size": SIZE},
        {"name": "log", "path": str(tmp_path / f"{node}-log.img"), "size": SIZE // 2}]
    group = {"name": "db", "role": role, "journal_size": "16MiB", "source": "q",
             "volumes": volumes, "targets": [], "link_keys": paths}
    cfg = parse({"node": node, "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": str(tmp_path / f"{node}-state"), "tls": False,
                 "peers": peers, "groups": [group]})
    g = Group(cfg.group("db"), cfg.state_dir)
    g.open()
    return g


@contextlib.asynccontextmanager
async def running(*groups: Group):
    """The groups' committers run (and stop, everything durable, at the end)."""
    for g in groups:
        g.start()
    try:
        async with asyncio.timeout(60):
            yield
    finally:
        for g in groups:
            await g.stop()


def submit(g: Group, payload: bytes) -> asyncio.Future:
    """Queue a received batch (as the receiver does); the future: its errno once written."""
    recs = raw_run(payload)
    fut = asyncio.get_running_loop().create_future()
    g.commit.submit_records(recs[0][0].seq, recs[-1][0].seq, payload, fut.set_result)
    return fut


async def durable(g: Group, fut: asyncio.Future) -> None:
    assert await fut == 0
    await g.commit.commit_now()


@contextlib.asynccontextmanager
async def processing_of(g: Group, local: list[Relay] | None = None):
    """A Processing of `g` with its worker running, and the list of PROCESSED frames it
    sends, in order; closed at the end."""
    sent: list[Processed] = []

    async def send(frame: Processed) -> None:
        sent.append(frame)

    failed: list[str] = []
    processing = Processing(g, local or [], LOG)
    processing.start(send, failed.append)
    try:
        yield processing, sent
    finally:
        await processing.close()
    assert not failed


async def until(condition, timeout: float = 10.0) -> None:
    """Poll until condition() holds (AssertionError after `timeout` seconds)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def restore_into(far: Group, restoring: Restoring, frame: Processed) -> tuple:
    """What the far receiver does with a PROCESSED frame that restores in full."""
    parts, last, mismatch = restoring.restore(frame)
    assert mismatch is None and last == frame.last_seq
    journal = b"".join(bytes(p) for p in parts)
    fut = submit(far, journal)
    restoring.records(journal)
    return journal, fut


def read(g: Group, volume: str, offset: int, length: int) -> bytes:
    return g.commit.read(g.volumes[volume], offset, length)


ALL_OPS = Op.DELTA | Op.ZSTD | Op.CHECKSUM | Op.ENCRYPT


def batches(rng: random.Random, first: int, count: int = 6) -> list[bytes]:
    """Batches of writes over a few overlapping regions, each record's extent written by
    earlier records of its own batch and of the batches before; some epochs span records
    and batches (FLAG_OPEN: not readable in the group until they close), the last record
    closes its epoch."""
    out, seq = [], first
    for b in range(count):
        batch, n = b"", rng.randint(1, 6)
        for i in range(n):
            offset, length = rng.choice([(0, 4096), (512, 1024), (2048, 8192), (65024, 1024)])
            flags = 0 if b == count - 1 and i == n - 1 or rng.random() < 0.7 else FLAG_OPEN
            if rng.random() < 0.15:
                batch += zero(seq, offset, length, flags=flags)
            else:
                page = bytearray(read_model(out, batch, offset, length))
                for _ in range(rng.choice([1, 16, length])):
                    page[rng.randrange(length)] = rng.randrange(256)
                batch += write(seq, bytes(page), offset, flags=flags)
            seq += 1
        out.append(batch)
    return out


def read_model(done: list[bytes], batch: bytes, offset: int, length: int) -> bytes:
    """The content of `data` [offset, +length) after the records of `done` and `batch`."""
    image = bytearray(SIZE)
    for rec, _ in raw_run(b"".join(done) + batch):
        if rec.kind is Kind.WRITE:
            image[rec.offset:rec.offset + rec.length] = rec.payload
        elif rec.kind is Kind.ZERO:
            image[rec.offset:rec.offset + rec.length] = bytes(rec.length)
    return bytes(image[offset:offset + length])


def model_base(done: list[bytes], batch: bytes):
    """base_of for the records of `batch`, after those of `done`: the model's content."""
    def base_of(rec):
        before = b"".join(rec_bytes for (r, _), rec_bytes in zip(raw_run(batch),
                                                                 records_of(batch))
                          if r.seq < rec.seq)
        return read_model(done, before, rec.offset, rec.length)
    return base_of


@pytest.mark.parametrize("seed", range(8))
def test_a_near_replica_processes_and_a_far_one_restores_byte_for_byte(tmp_path, seed):
    async def main():
        near = replica(tmp_path, "near", {"far": KEY})
        far = replica(tmp_path, "far", {"far": KEY})
        async with running(near, far), processing_of(near) as (processing, sent):
            answer = processing.ask(Offload(target="far", ops=int(ALL_OPS)))
            assert answer == Offload(target="far", ops=int(ALL_OPS)) and processing.active
            restoring = Restoring(far, "far", LOG)
            rng = random.Random(seed)
            pending, done = [], []
            for i, batch in enumerate(batches(rng, 1)):
                fut = submit(near, batch)
                processing.take(batch)  # in the same turn: none of it is readable
                await until(lambda: len(sent) > i)  # processed later, the group may show it
                frame = sent[i]
                assert (frame.target, frame.first_seq, frame.last_seq) == \
                    ("far", raw_run(batch)[0][0].seq, raw_run(batch)[-1][0].seq)
                # each write was processed against what the records before it left there
                assert restore_run(Restorer(KEY), frame.payload,
                                   model_base(done, batch)) == records_of(batch)
                done.append(batch)
                journal, far_fut = restore_into(far, restoring, frame)
                assert journal == batch
                pending += [(near, fut), (far, far_fut)]
                if rng.random() < 0.5:  # sometimes the groups catch up, sometimes not
                    for g, f in pending:
                        await durable(g, f)
                    pending = []
            for g, f in pending:
                await durable(g, f)
            expected = read_model(batches(random.Random(seed), 1), b"", 0, SIZE)
            assert len(sent) == len(done)
            assert read(near, "data", 0, SIZE) == read(far, "data", 0, SIZE) == expected

    asyncio.run(main())


def test_the_base_of_a_write_sees_the_earlier_records_of_its_batch(tmp_path):
    async def main():
        near = replica(tmp_path, "near")
        async with running(near):
            image = Image(near, 0)
            first = raw_run(write(1, b"a" * 1024, 512))[0][0]
            image.feed(first)
            image.feed(raw_run(zero(2, 1024, 256))[0][0])
            later = raw_run(write(3, b"c" * 2048))[0][0]
            assert image.base(later) == bytes(512) + b"a" * 512 + bytes(256) + b"a" * 256 + \
                bytes(512)
            fut = submit(near, write(1, b"a" * 1024, 512) + zero(2, 1024, 256))
            await durable(near, fut)
            image.settle()  # the group shows them now: the image forgets them
            assert not image._pending
            assert image.base(later) == bytes(512) + b"a" * 512 + bytes(256) + b"a" * 256 + \
                bytes(512)

    asyncio.run(main())


def test_a_write_past_the_volumes_is_corrupt(tmp_path):
    near = replica(tmp_path, "near")
    image = Image(near, 0)
    for rec_bytes in (write(1, b"x", volume=b"nope"), write(1, b"x" * 512, SIZE - 511),
                      write(1, b"x" * 2, SIZE // 2 - 1, volume=b"log")):
        rec = raw_run(rec_bytes)[0][0]
        with pytest.raises(ProcessedError, match="which group db does not have"):
            image.base(rec)
    far = replica(tmp_path, "far")
    restoring = Restoring(far, "far", LOG)
    run = process_run(Processor(Op.DELTA), write(1, b"x" * 512, SIZE - 511),
                      lambda rec: bytes(rec.length))
    with pytest.raises(ProcessedError, match="which group db does not have"):
        restoring.restore(Processed(target="far", first_seq=1, last_seq=1, payload=run))


def test_a_run_must_hold_exactly_its_seqs(tmp_path):
    far = replica(tmp_path, "far")
    restoring = Restoring(far, "far", LOG)
    proc = Processor(Op.DELTA | Op.CHECKSUM)
    base = lambda rec: bytes(rec.length)  # noqa: E731
    run = process_run(proc, write(1, b"a" * 600) + write(2, b"b" * 600, 4096), base)
    with pytest.raises(ProcessedError, match="processed run 1..3 holds 1..2"):
        restoring.restore(Processed(target="far", first_seq=1, last_seq=3, payload=run))
    restoring = Restoring(far, "far", LOG)
    run = process_run(proc, write(1, b"a" * 600) + write(3, b"b" * 600, 4096), base)
    with pytest.raises(ProcessedError, match="seq 3 after 1"):
        restoring.restore(Processed(target="far", first_seq=1, last_seq=3, payload=run))


def test_a_far_replica_on_another_base_takes_nothing_from_the_mismatch_on(tmp_path):
    async def main():
        near, far = replica(tmp_path, "near"), replica(tmp_path, "far")
        async with running(near, far), processing_of(near) as (processing, sent):
            processing.ask(Offload(target="far", ops=int(Op.DELTA | Op.ZSTD | Op.CHECKSUM)))
            restoring = Restoring(far, "far", LOG)
            first = write(1, b"A" * 4096)
            await durable(near, submit(near, first))
            processing.take(first)
            await until(lambda: sent)
            assert sent[0].last_seq == 1
            rotten = write(1, b"A" * 4000 + b"R" * 96)  # what the far replica holds instead
            await durable(far, submit(far, rotten))
            restoring.records(rotten)
            batch = write(2, b"B" * 4096, 8192) + write(3, b"C" * 4096)
            submit(near, batch)
            processing.take(batch)
            await until(lambda: len(sent) == 2)
            parts, last, mismatch = restoring.restore(sent[1])
            assert last == 2 and b"".join(bytes(p) for p in parts) == write(2, b"B" * 4096, 8192)
            assert isinstance(mismatch, BaseMismatch) and mismatch.record.seq == 3
            assert (mismatch.record.volume, mismatch.record.offset, mismatch.record.length) == \
                ("data", 0, 4096)

    asyncio.run(main())


def test_records_sent_again_do_not_change_the_far_image(tmp_path):
    """The wire allows RECORDS that overlap what was sent (the group skips what it holds):
    a record sent again must not lay its old content over what later records wrote."""
    async def main():
        far = replica(tmp_path, "far")
        async with running(far):
            restoring = Restoring(far, "far", LOG)
            held = write(1, b"A" * 4096) + write(2, b"B" * 4096, 8192) + write(3, b"C" * 4096)
            fut = submit(far, held)
            restoring.records(held)
            await durable(far, fut)
            newer = write(4, b"D" * 4096, 65536)
            submit(far, newer)  # queued, not readable yet
            restoring.records(newer)
            again = write(1, b"A" * 4096)
            submit(far, again)  # held already: skipped
            restoring.records(again)
            run = process_run(Processor(Op.DELTA | Op.CHECKSUM), write(5, b"E" * 4096),
                              lambda rec: b"C" * 4096)
            parts, last, mismatch = restoring.restore(
                Processed(target="far", first_seq=5, last_seq=5, payload=run))
            assert mismatch is None and last == 5
            assert b"".join(bytes(p) for p in parts) == write(5, b"E" * 4096)

    asyncio.run(main())


def test_a_far_session_begun_inside_an_open_epoch_sees_it_sent_again(tmp_path):
    """WELCOME names the last epoch boundary: the open epoch's records come again (the
    group skips them) and the image of the new session must hold them."""
    async def main():
        far = replica(tmp_path, "far")
        async with running(far):
            opened = write(1, b"A" * 4096, flags=FLAG_OPEN)
            await durable(far, submit(far, opened))
            assert (far.commit.consistent_seq, far.commit.durable_seq) == (0, 1)
            restoring = Restoring(far, "far", LOG)  # the next session
            submit(far, opened)
            restoring.records(opened)
            run = process_run(Processor(Op.DELTA | Op.CHECKSUM), write(2, b"B" * 4096),
                              lambda rec: b"A" * 4096)
            parts, last, mismatch = restoring.restore(
                Processed(target="far", first_seq=2, last_seq=2, payload=run))
            assert mismatch is None and b"".join(bytes(p) for p in parts) == write(2, b"B" * 4096)

    asyncio.run(main())


def test_a_session_begun_mid_stream_processes_once_the_group_is_consistent(tmp_path):
    async def main():
        near = replica(tmp_path, "near")
        async with running(near):
            early = submit(near, write(1, b"1" * 512))
            # seq 1 is queued, not readable
            async with processing_of(near) as (processing, sent):
                processing.ask(Offload(target="far", ops=int(Op.DELTA)))
                second = write(2, b"2" * 512, 256)
                submit(near, second)
                processing.take(second)  # its base is not known here: not processed
                await durable(near, early)
                await near.commit.commit_now()
                third = write(3, b"3" * 1024)
                submit(near, third)
                processing.take(third)
                await until(lambda: sent)
                (frame,) = sent  # batches are processed in order: none came for seq 2
                assert (frame.first_seq, frame.last_seq) == (3, 3)
                restored = restore_run(Restorer(), frame.payload,
                                       lambda rec: b"1" * 256 + b"2" * 512 + bytes(256))
                assert restored == [third]
                processing.take(second + third)  # resent: processed once
                fourth = write(4, b"4" * 512, 4096)
                submit(near, fourth)
                processing.take(fourth)
                await until(lambda: len(sent) == 2)
                assert [(f.first_seq, f.last_seq) for f in sent] == [(3, 3), (4, 4)]

    asyncio.run(main())


def test_a_cascade_node_processes_into_its_own_relays(tmp_path):
    async def main():
        near = replica(tmp_path, "near")
        async with running(near):
            relay = Relay(FAR, wait=3600)
            async with processing_of(near, [relay]) as (processing, sent):
                assert processing.active and relay.processing
                waiting = asyncio.create_task(relay.wait_for(1))  # the far link waits
                await asyncio.sleep(0)
                assert not waiting.done()
                batch = write(1, b"x" * 4096) + write(2, b"y" * 4096)
                fut = submit(near, batch)
                processing.take(batch)
                assert await waiting
                assert sent == []  # no frames: the runs are the relay's
            assert not relay.processing  # closed: the far link no longer waits
            await durable(near, fut)
            last, (run,) = relay.take(1, 2, 1 << 20)
            assert last == 2
            assert b"".join(restore_run(Restorer(), run, lambda rec: bytes(rec.length)
                                        if rec.seq == 1 else b"x" * 4096)) == batch

    asyncio.run(main())


@pytest.mark.parametrize("ops,keys,reason", [
    (0, {}, "unknown processing ops 0x0"),
    (0x10, {}, "unknown processing ops 0x10"),
    (int(Op.ENCRYPT), {}, "no link key for far in group db's link_keys"),
])
def test_a_near_replica_says_why_it_will_not_process(tmp_path, ops, keys, reason):
    processing = Processing(replica(tmp_path, "near", keys), [], LOG)
    answer = processing.ask(Offload(target="far", ops=ops))
    assert answer.ops == 0 and reason in answer.reason and not processing.active


def test_a_bunker_will_not_process(tmp_path):
    processing = Processing(replica(tmp_path, "near", role="bunker"), [], LOG)
    answer = processing.ask(Offload(target="far", ops=int(Op.DELTA)))
    assert answer.ops == 0 and "a bunker" in answer.reason


def test_a_far_replica_without_its_key_refuses_encrypted_runs(tmp_path, caplog):
    far = replica(tmp_path, "far")
    bad = tmp_path / "bad.key"
    bad.write_text("0123")
    object.__setattr__(far.cfg, "link_keys", {"far": str(bad)})
    with caplog.at_level(logging.ERROR):
        restoring = Restoring(far, "far", LOG)
    assert "must hold 64 hex digits" in caplog.text
    run = process_run(Processor(Op.ENCRYPT, KEY), write(1, b"s" * 64), lambda rec: None)
    with pytest.raises(ProcessedError, match="no key for the link"):
        restoring.restore(Processed(target="far", first_seq=1, last_seq=1, payload=run))


def test_a_relay_that_stops_processing_wakes_its_waiter_at_once():
    async def main():
        relay = Relay(TargetConfig(node="far", mode="async", via="near", process=("delta",)),
                      via="near", wait=30.0)
        relay.processing = True
        waiter = asyncio.create_task(relay.wait_for(1))
        await asyncio.sleep(0)  # the waiter is waiting now
        relay.processing = False
        assert await asyncio.wait_for(waiter, 5) is False
        relay.processing = True
        relay.add(1, 1, b"run")
        assert await relay.wait_for(1)  # not given up: the near node only went away
    asyncio.run(main())
