"""Coverage-guided fuzzing (atheris) of every parser that reads bytes it did not write.

    python fuzz/fuzz_parsers.py TARGET [libFuzzer flags] [CORPUS_DIR ...]
    python fuzz/fuzz_parsers.py --seeds TARGET DIR     # write the seed corpus of TARGET
    python fuzz/fuzz_parsers.py --list

scripts/fuzz.sh runs every target in turn (one process at a time). Each target's oracle:
the parser returns, or raises the clean error type its module declares (ProtocolError,
RecordError, JournalError, BitmapError, UndoError, ConfigError); the NBD server closes
the connection or keeps serving, and never logs an internal error. Anything else (an
IndexError, a struct.error, a UnicodeDecodeError, a RecursionError, a MemoryError...)
propagates and atheris writes the input as a crash artifact; -timeout catches hangs and
-rss_limit_mb allocations beyond the declared limits.

Checksums: most formats checksum their bytes, and a coverage-guided fuzzer seldom hits a
right CRC32C by chance, so every target reads its first byte as a mode: with bit 0 set
the harness recomputes the checksums of the fuzzed bytes before parsing (what a
writer with a bug, or a hostile peer, would send), otherwise the bytes go as they are.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["replicator"]):
    import zstandard
    from crc32c import crc32c

    from replicator import bitmap as bitmap_mod
    from replicator import config as config_mod
    from replicator import undo as undo_mod
    from replicator.capture import nbd as nbd_mod
    from replicator.journal import record as record_mod
    from replicator.journal import segments as segments_mod
    from replicator.journal.space import JournalError
    from replicator.wire import connection as conn_mod
    from replicator.wire import frames as frames_mod
    from tests import nbd_fakes  # (after replicator: its imports are instrumented above)

# The journal warns at every torn tail it cuts: thousands of lines a second, and slow.
logging.getLogger("replicator.journal").setLevel(logging.ERROR)

MAX_FRAME = 1 << 16  # small, so that a frame at the limit is cheap to build
SCRATCH = tempfile.mkdtemp(prefix="replicator-fuzz-",
                           dir="/dev/shm" if os.path.isdir("/dev/shm") else None)

# ---- wire: frame bodies -----------------------------------------------------------------

_DECOMPRESSOR = zstandard.ZstdDecompressor()


def fuzz_wire_frames(data: bytes) -> None:
    """decode_body of any type, flags and body; a decoded event re-encodes to a body
    that decodes to the same encoding again (a fixed point after one round)."""
    if len(data) < 3:
        return
    mode, type_code, flags = data[0], data[1], data[2] & 0x03 if data[0] & 2 else data[2]
    body = memoryview(data[3:])
    decompressor = _DECOMPRESSOR if mode & 4 else None
    try:
        event = frames_mod.decode_body(type_code, flags, body, max_frame=MAX_FRAME,
                                       decompressor=decompressor)
    except frames_mod.RemoteProtocolError:
        return
    if event is None:
        assert type_code >= frames_mod.IGNORABLE_FROM
        return
    if isinstance(event, frames_mod.Records) and event.compress:
        event = frames_mod.Records(first_seq=event.first_seq, last_seq=event.last_seq,
                                   payload=event.payload)
    flags1, parts1 = frames_mod.encode_body(event, max_frame=MAX_FRAME)
    body1 = b"".join(bytes(p) for p in parts1)
    again = frames_mod.decode_body(type_code, flags1, memoryview(body1), max_frame=MAX_FRAME)
    flags2, parts2 = frames_mod.encode_body(again, max_frame=MAX_FRAME)
    assert (flags2, b"".join(bytes(p) for p in parts2)) == (flags1, body1), event


# ---- wire: the connection state machine -------------------------------------------------

_ROLES = (conn_mod.Role.SENDER, conn_mod.Role.RECEIVER)


def _hello(features: int) -> frames_mod.Hello:
    return frames_mod.Hello(proto_min=3, proto_max=3, features=features, node="a",
                            group="g", target="b", seq=10)


def _connection(mode: int) -> conn_mod.Connection:
    """A connection in START, or (mode bit 2) past the handshake, with ZSTD (bit 3) and
    FETCH (bit 4) or PROCESSED (bit 5) agreed."""
    role = _ROLES[mode >> 1 & 1]
    conn = conn_mod.Connection(role, max_frame=MAX_FRAME)
    if mode & 4:
        features = (mode >> 3 & 1) * 1 | (mode >> 4 & 1) * 2 | (mode >> 5 & 1) * 4
        welcome = frames_mod.Welcome(version=3, features=features, seq=5, crc=0, node="b")
        if role is conn_mod.Role.SENDER:
            conn.send(_hello(features))
            conn.receive_data(_frame(welcome))
            event = conn.next_event()
            assert isinstance(event, frames_mod.Welcome), event
        else:
            conn.receive_data(_frame(_hello(features)))
            event = conn.next_event()
            assert isinstance(event, frames_mod.Hello), event
            conn.send(welcome)
    return conn


def _frame(event) -> bytes:
    flags, parts = frames_mod.encode_body(event, max_frame=MAX_FRAME)
    return bytes(frames_mod.encode_header(event.frame_type, flags, parts)) + b"".join(
        bytes(p) for p in parts)


def _fix_frames(stream: bytes) -> bytes:
    """Recompute both CRCs of every frame in `stream` (lengths as they stand)."""
    out, pos = bytearray(), 0
    while len(stream) - pos >= frames_mod.HEADER_SIZE:
        magic, kind, flags, length, _crc, _pad = frames_mod.HEADER.unpack_from(stream, pos)
        length = min(length, len(stream) - pos - frames_mod.HEADER_SIZE)
        body = stream[pos + frames_mod.HEADER_SIZE:pos + frames_mod.HEADER_SIZE + length]
        header = bytearray(frames_mod.HEADER.pack(magic, kind, flags, length, crc32c(body), 0))
        struct.pack_into("<I", header, frames_mod.HEADER_CRC_OFFSET, crc32c(header[:12]))
        out += header + body
        pos += frames_mod.HEADER_SIZE + length
    return bytes(out + stream[pos:])


def fuzz_wire_connection(data: bytes) -> None:
    """Arbitrary bytes into a connection in any role and state, fed in chunks, then EOF:
    every step ends in an event, NEED_DATA, ConnectionClosed or RemoteProtocolError,
    the buffer never holds more than max_frame + 16 bytes, and a failed connection still
    gives its ERROR frame."""
    if len(data) < 2:
        return
    mode, chunk = data[0], 1 + data[1] % 64
    stream = data[2:]
    if mode & 1:
        stream = _fix_frames(stream)
    conn = _connection(mode)
    try:
        for at in range(0, len(stream) + 1, chunk):
            piece = stream[at:at + chunk]
            conn.receive_data(piece)  # b"" at the end: EOF
            while True:
                event = conn.next_event()
                assert len(conn._buf) <= MAX_FRAME + frames_mod.HEADER_SIZE + chunk
                if event is conn_mod.NEED_DATA or isinstance(event, conn_mod.ConnectionClosed):
                    break
            if not piece:
                break
    except frames_mod.RemoteProtocolError:
        assert conn.state is conn_mod.State.ERROR
        conn.send_failure()
    except frames_mod.LocalProtocolError:
        # receive_data after EOF is the only local error feeding can make: not reached
        raise


# ---- journal: records and recovery ------------------------------------------------------

def _fix_records(buf: bytes) -> bytes:
    """Recompute the header and payload CRCs of every record in `buf`."""
    out, pos = bytearray(buf), 0
    size = record_mod.HEADER_SIZE
    while len(out) - pos >= size:
        _magic, _crc, seq, offset, length, _pcrc, time_ns, kind, name_len, flags = \
            record_mod.HEADER.unpack_from(out, pos)
        name_end = min(pos + size + name_len, len(out))
        end = name_end + length if kind == record_mod.Kind.WRITE and \
            length <= record_mod.MAX_LENGTH else name_end
        end = min(end, len(out))
        pcrc = crc32c(out[name_end:end]) if end > name_end else 0
        struct.pack_into("<I", out, pos + 28, pcrc)
        struct.pack_into("<I", out, pos + 4, crc32c(out[pos + 8:name_end]))
        pos = max(end, pos + 1)
    return bytes(out)


def fuzz_journal_record(data: bytes) -> None:
    """decode, decode_head, iterate and trusted_extent of any bytes at any position."""
    if not data:
        return
    mode, buf = data[0], data[1:]
    if mode & 1:
        buf = _fix_records(buf)
    pos = (mode >> 1) % 8 if buf else 0
    pos = min(pos, len(buf))
    assert pos <= record_mod.trusted_extent(buf, pos) <= len(buf)
    for fn in (record_mod.decode, record_mod.decode_head):
        try:
            rec = fn(buf, pos)
        except record_mod.RecordError:
            continue
        if fn is record_mod.decode:
            assert pos + rec.size <= len(buf)
            parts = record_mod.rewritten(rec, rec.flags)
            assert b"".join(bytes(p) for p in parts) == bytes(buf[pos:pos + rec.size])
    try:
        for rec in record_mod.iterate(buf, pos):
            assert rec.size > 0
    except record_mod.RecordError:
        pass


_journal_counter = [0]


def fuzz_journal_recovery(data: bytes) -> None:
    """Journal.open over one or two segments of any bytes (and a base file): it opens
    (cutting a torn tail) or raises JournalError; an opened journal reads back every
    record it indexed, and opens again to the same position."""
    if len(data) < 2:
        return
    mode = data[0]
    _journal_counter[0] += 1
    directory = os.path.join(SCRATCH, f"j{_journal_counter[0]}")
    os.mkdir(directory)
    try:
        rest = data[1:]
        split = rest.find(b"--SEG--")
        segs = [rest] if split < 0 else [rest[:split], rest[split + 7:]]
        if mode & 1:
            segs = [_fix_records(s) for s in segs]
        first = 1
        for seg in segs:
            with open(os.path.join(directory, f"{first:020d}.seg"), "wb") as f:
                f.write(seg)
            first += 1 + (mode >> 4 & 3)
        if mode & 2:
            with open(os.path.join(directory, "base"), "wb") as f:
                f.write(b"0 0\n" if not mode & 4 else rest[:16])
        journal = segments_mod.Journal(directory, capacity=1 << 20, segment_size=1 << 20)
        try:
            journal.open()
        except JournalError:
            journal.close()
            return
        try:
            position = journal.position()
            records = list(journal.records(journal.base.seq))
            assert len(records) == journal.last_seq - journal.base.seq
            assert [r.seq for r in records] == list(range(journal.base.seq + 1,
                                                          journal.last_seq + 1))
        finally:
            journal.close()
        again = segments_mod.Journal(directory, capacity=1 << 20, segment_size=1 << 20)
        again.open()
        try:
            assert again.position() == position
        finally:
            again.close()
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


# ---- NBD: the handshake's options and the transmission requests -------------------------

_nbd_log, _nbd_errors = nbd_fakes.make_logger("replicator.fuzz.nbd")


def fuzz_nbd(data: bytes) -> None:
    """Arbitrary client bytes into one server connection (plain or TLS-only listener),
    fed in pieces through get_buffer/buffer_updated as asyncio does (tests/nbd_fakes.py),
    exports completing at once or later: it never logs an internal error, never calls an
    export out of range, never writes after closing, and holds no write payload above
    max_request."""
    if len(data) < 2:
        return
    mode, chunk = data[0], 1 + data[1] * 37 % 4096
    stream = data[2:]
    if mode & 1:  # start past the client flags, so the fuzzer goes straight to options
        stream = nbd_fakes.CLIENT_FLAGS + stream
    del _nbd_errors.records[:]
    nbd_fakes.drive(stream, chunk=chunk, tls=bool(mode & 2), deferred=bool(mode & 4),
                    per_export=1 + (mode >> 3 & 1), turns=bool(mode & 16), log=_nbd_log)
    assert not _nbd_errors.records, [r.getMessage() for r in _nbd_errors.records]


# ---- config -----------------------------------------------------------------------------

def fuzz_config(data: bytes) -> None:
    """load() of any file: a Config or ConfigError."""
    path = os.path.join(SCRATCH, "config.yml")
    with open(path, "wb") as f:
        f.write(data)
    try:
        config_mod.load(path)
    except config_mod.ConfigError as exc:
        assert exc.errors and all(isinstance(p, str) and m for p, m in exc.errors)


# ---- bitmap and undo log ----------------------------------------------------------------

BITMAP_VOLUMES = {"data": 1 << 20, "log": 300 << 10}


def fuzz_bitmap(data: bytes) -> None:
    """Bitmap.load of any file: True (and then the bits fit the volumes) or BitmapError."""
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        body = body + struct.pack("<I", crc32c(body))
    path = os.path.join(SCRATCH, "bitmap")
    with open(path, "wb") as f:
        f.write(body)
    bm = bitmap_mod.Bitmap(path, BITMAP_VOLUMES, granularity=4096 << (mode >> 1 & 3))
    try:
        loaded = bm.load()
    except bitmap_mod.BitmapError:
        return
    assert loaded
    for name, bits in bm.bits.items():
        assert len(bits) == -(-bm.regions(name) // 8), (name, len(bits))
    list(bm.dirty())
    bm.count()


def _fix_undo(buf: bytes) -> bytes:
    out, pos, size = bytearray(buf), 0, undo_mod._ENTRY.size
    while len(out) - pos >= size:
        _magic, n, _skip, length, _crc = undo_mod._ENTRY.unpack_from(out, pos)
        start = pos + size + n
        end = min(start + length, len(out))
        struct.pack_into("<I", out, pos + 18, crc32c(out[min(start, len(out)):end]))
        pos = max(end, pos + 1)
    return bytes(out)


def fuzz_undo(data: bytes) -> None:
    """UndoLog.open of any file, then every entry newest first: UndoError or entries."""
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        body = _fix_undo(body)
    path = os.path.join(SCRATCH, "undo")
    with open(path, "wb") as f:
        f.write(body)
    log = undo_mod.UndoLog(path)
    try:
        log.open()
        for volume, offset, old in log.entries_newest_first():
            assert isinstance(volume, str) and isinstance(old, bytes)
        assert len(log) == len(log.saved) or len(log) >= len(log.saved)
    except undo_mod.UndoError:
        pass
    finally:
        log.close()


TARGETS = {
    "wire_frames": fuzz_wire_frames,
    "wire_connection": fuzz_wire_connection,
    "journal_record": fuzz_journal_record,
    "journal_recovery": fuzz_journal_recovery,
    "nbd": fuzz_nbd,
    "config": fuzz_config,
    "bitmap": fuzz_bitmap,
    "undo": fuzz_undo,
}


# ---- seed corpora -----------------------------------------------------------------------

def seeds(target: str) -> list[bytes]:
    """Valid inputs of each target, for a corpus to start from."""
    F = frames_mod
    events = [
        _hello(7), F.Welcome(version=3, features=1, seq=5, crc=9, node="b",
                             history=((1, 1), (2, 6))),
        F.Refuse(code=F.Refusal.BUSY, reason="busy"),
        F.Records(first_seq=6, last_seq=7, payload=b"x" * 100),
        F.Ack(seq=7, durable=6), F.Heartbeat(sent_ns=1), F.Error(code=13, message="bad"),
        F.ResyncData(volume="v", offset=4096, payload=b"y" * 64),
        F.ResyncDone(seq=7, crc=1), F.ResyncAck(count=2), F.ResyncBegin(seq=7),
        F.HashRequest(id=1, seq=7, volume="v", offset=0, length=8192, granularity=4096),
        F.HashReply(id=1, seq=7, hashes=bytes(32)),
        F.Diverged(fork=3, complete=True, extents=(("v", 0, 4096),)),
        F.Handover(seq=7, targets=(("c", "sync", "zstd", "block", None),
                                   ("d", "periodic", "none", "continue", 1.5))),
        F.Fetch(seq=5, crc=0), F.Retain(seq=5), F.Successor(seq=5, node="c"),
        F.Flush(seq=5), F.Offload(target="far", ops=3, reason=""),
        F.Processed(target="far", first_seq=6, last_seq=6, payload=b"p"),
        F.Mismatch(seq=6, volume="v", offset=0, length=4096),
        F.Report(report={"node": "b", "lag": [1, 2.5, None]}),
    ]
    if target == "wire_frames":
        out = []
        for ev in events:
            flags, parts = F.encode_body(ev, max_frame=MAX_FRAME)
            out.append(bytes([0, ev.frame_type, flags]) + b"".join(bytes(p) for p in parts))
        packed = zstandard.ZstdCompressor().compress(b"r" * 300)
        out.append(bytes([4, F.FrameType.RECORDS, 1]) + struct.pack("<QQI", 1, 1, 300) + packed)
        return out
    if target == "wire_connection":
        stream = b"".join(_frame(ev) for ev in events[3:8])
        return [bytes([mode, 15]) + stream for mode in (4, 6, 12, 14, 0x14, 0x16, 0x24)] + [
            bytes([2, 63]) + _frame(_hello(1)), bytes([0, 63]) + _frame(events[1])]
    rec = record_mod
    records = b"".join(
        rec.encode_header(seq, b"data", seq * 4096, 8, rec.Kind.WRITE, 1, b"8 bytes!", flags)
        + b"8 bytes!" for seq, flags in ((1, 0), (2, 1), (3, 0))) + \
        rec.encode_header(4, b"data", 0, 1 << 20, rec.Kind.ZERO, 1, b"") + \
        rec.encode_header(5, b"m1", 1, 0, rec.Kind.MARKER, 1, b"") + \
        rec.encode_header(6, b"data", 0, 0, rec.Kind.SKIP, 1, b"")
    if target == "journal_record":
        return [b"\x00" + records, b"\x01" + records[:100]]
    if target == "journal_recovery":
        return [b"\x00" + records, b"\x02" + records + b"--SEG--" + records,
                b"\x00" + records + bytes(600), b"\x01" + records[:-5]]
    if target == "nbd":
        opt = struct.Struct(">QII")
        go = struct.pack(">I", 4) + b"data" + struct.pack(">HH", 1, 2)
        req = struct.Struct(">IHHQQI")
        handshake = (opt.pack(nbd_mod.IHAVEOPT, 3, 0) + opt.pack(nbd_mod.IHAVEOPT, 6, len(go))
                     + go + opt.pack(nbd_mod.IHAVEOPT, 7, len(go)) + go)
        requests = (req.pack(nbd_mod.REQUEST_MAGIC, 1, 1, 1, 0, 16) + b"w" * 16
                    + req.pack(nbd_mod.REQUEST_MAGIC, 0, 0, 2, 0, 16)
                    + req.pack(nbd_mod.REQUEST_MAGIC, 0, 3, 3, 0, 0)
                    + req.pack(nbd_mod.REQUEST_MAGIC, 0, 4, 4, 4096, 4096)
                    + req.pack(nbd_mod.REQUEST_MAGIC, 2, 6, 5, 0, 4096)
                    + req.pack(nbd_mod.REQUEST_MAGIC, 0, 2, 6, 0, 0))
        name = opt.pack(nbd_mod.IHAVEOPT, 1, 4) + b"data"
        return [bytes([1, 255]) + handshake + requests, bytes([0x15, 3]) + handshake + requests,
                bytes([1, 255]) + name + requests, bytes([3, 255]) + opt.pack(
                    nbd_mod.IHAVEOPT, 5, 0) + handshake, bytes([0, 1]) + nbd_fakes.CLIENT_FLAGS]
    if target == "config":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        from tests.unit.test_config import BASE  # the config the unit tests start from
        out = [BASE.encode()]
        for name in ("docs", "inventories"):
            for dirpath, _dirs, files in os.walk(os.path.join(root, name)):
                out += [open(os.path.join(dirpath, f), "rb").read() for f in files
                        if f.endswith((".yml", ".yaml")) and "replicator" in f][:4]
        return out
    if target == "bitmap":
        path = os.path.join(SCRATCH, "seed-bitmap")
        bm = bitmap_mod.Bitmap(path, BITMAP_VOLUMES, granularity=4096)
        bm.mark("data", 0, 100000)
        bm.mark("log", 200000, 1)
        bm.save()
        raw = open(path, "rb").read()
        return [b"\x00" + raw, b"\x01" + raw[:-4]]
    if target == "undo":
        entries = b"".join(undo_mod._ENTRY.pack(undo_mod.MAGIC, 4, off, 8, crc32c(b"old data"))
                           + b"data" + b"old data" for off in (0, 4096, 8192))
        return [b"\x00" + entries, b"\x01" + entries[:-3]]
    raise KeyError(target)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--list"]:
        print("\n".join(TARGETS))
        return
    if argv[:1] == ["--seeds"]:
        target, directory = argv[1], argv[2]
        os.makedirs(directory, exist_ok=True)
        for i, seed in enumerate(seeds(target)):
            with open(os.path.join(directory, f"seed-{i:03d}"), "wb") as f:
                f.write(seed)
        return
    if not argv or argv[0] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer flags] [CORPUS ...]; "
                 f"targets: {', '.join(TARGETS)}")
    target = TARGETS[argv[0]]
    atheris.Setup([sys.argv[0], *argv[1:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
