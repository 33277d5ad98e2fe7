"""A periodic link's coalescer: the coalesced epoch leaves the same image as every record
of it, skips exactly the records written over later in the epoch, and keeps the seqs
and the last record as they are."""

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.journal.record import FLAG_OPEN, Kind, decode, encode_header, iterate
from replicator.shipping.epoch import Extents, coalesced, rewrites

VOLUME_SIZE = 256  # bytes: small, so that overlaps are common
VOLUMES = ("data", "log")

ops = st.lists(st.tuples(
    st.sampled_from(VOLUMES),
    st.sampled_from([Kind.WRITE, Kind.WRITE, Kind.ZERO, Kind.SKIP]),
    st.integers(0, VOLUME_SIZE - 1),
    st.integers(0, 96),
    st.booleans(),  # FLAG_OPEN as it came from upstream (a cascade's second hop)
), min_size=1, max_size=40)


def encoded_epoch(first_seq: int, spec) -> bytes:
    out = bytearray()
    for i, (volume, kind, offset, length, open_) in enumerate(spec):
        length = min(length, VOLUME_SIZE - offset)
        if kind == Kind.SKIP:
            length = 0
        payload = bytes((first_seq + i + j) % 251 + 1 for j in range(length)) \
            if kind == Kind.WRITE else b""
        last = i == len(spec) - 1  # an epoch ends at a consistent seq: no FLAG_OPEN
        out += encode_header(first_seq + i, volume.encode(), offset, length, kind, 1000 + i,
                             payload, FLAG_OPEN if open_ and not last else 0)
        out += payload
    return bytes(out)


def apply(images: dict, rec) -> None:
    img = images[rec.volume]
    if rec.kind == Kind.WRITE:
        img[rec.offset:rec.offset + rec.length] = rec.payload
    elif rec.kind == Kind.ZERO:
        img[rec.offset:rec.offset + rec.length] = bytes(rec.length)


def blank() -> dict:
    return {v: bytearray(b"\xee" * VOLUME_SIZE) for v in VOLUMES}


@settings(max_examples=400, deadline=None)
@given(ops, st.integers(1, 1 << 40))
def test_coalesced_epoch_gives_the_same_image(spec, first_seq):
    data = encoded_epoch(first_seq, spec)
    records = list(iterate(data))
    skip = rewrites(records)
    sent = [(rec, b"".join(bytes(b) for b in bufs)) for rec, bufs in coalesced(records, skip)]

    every, coalesced_image = blank(), blank()
    for rec in records:
        apply(every, rec)
    out = [decode(raw) for _, raw in sent]
    for rec in out:
        apply(coalesced_image, rec)
    assert coalesced_image == every

    # seqs unchanged and gap-free, one sent record per record
    assert [r.seq for r in out] == list(range(first_seq, first_seq + len(records)))
    # every record but the last is open; the last goes byte for byte as it is
    assert all(r.flags & FLAG_OPEN for r in out[:-1])
    last = records[-1]
    assert sent[-1][1] == data[len(data) - last.size:] and not out[-1].flags & FLAG_OPEN
    # skipped exactly the records whose every byte a later one of the epoch writes again
    for i, (rec, sent_rec) in enumerate(zip(records, out)):
        later = {(r.volume, b) for r in records[i + 1:] if r.kind != Kind.SKIP
                 for b in range(r.offset, r.offset + r.length)}
        mine = {(rec.volume, b) for b in range(rec.offset, rec.offset + rec.length)} \
            if rec.kind != Kind.SKIP else set()
        rewritten_later = i < len(records) - 1 and mine <= later
        assert bool(skip[i]) == rewritten_later
        if rewritten_later:
            assert (sent_rec.kind, sent_rec.length, sent_rec.payload) == (Kind.SKIP, 0, b"")
            assert (sent_rec.volume, sent_rec.time_ns) == (rec.volume, rec.time_ns)
        elif i < len(records) - 1:
            assert (sent_rec.kind, sent_rec.offset, sent_rec.length, bytes(sent_rec.payload)) \
                == (rec.kind, rec.offset, rec.length, bytes(rec.payload))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=30),
       st.integers(0, 200), st.integers(0, 60))
def test_extents_cover_what_was_added(ranges, start, length):
    ext, held = Extents(), set()
    for s, n in ranges:
        ext.add(s, s + n)
        held |= set(range(s, s + n))
    assert ext.covers(start, start + length) == (set(range(start, start + length)) <= held)
    assert all(a < b for a, b in zip(ext.ends, ext.starts[1:]))  # disjoint, not touching
