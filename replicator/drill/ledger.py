"""The DR drill's workload: a writer that logs every acknowledged write, and a checker.

"Acknowledged" is NBD's durability point (DESIGN.md, "The durability contract"): a
write's reply only says it was journaled, like a disk's volatile write cache; it is
acknowledged, and may be counted on after a failover, once it is covered by a
completed NBD FLUSH (or was itself written with FUA). The writer flushes the way a
database commits.

Writer (`run_workload`, `write` command). Connects to an NBD export and writes
self-describing blocks (`replicator.drill.block`): write i goes to block
`Order.block(i)`, so each block is written at most once per run and the expected
content of every block is known. With queue depth 1 (the default) the next write is
sent only after the previous reply, so completion order is write order; with
`--iodepth N` up to N writes are in flight and replies are matched by cookie (= write
index). A write whose reply arrives without error is held. After every
`--flush-every N` (8) held writes, and once more before the writer stops for whatever
is held, it sends NBD_CMD_FLUSH (cookie 2**64-1, never a write's; one flush in flight
at a time; writes go on meanwhile). Only when that FLUSH's reply arrives without error
are the writes whose replies arrived BEFORE it was sent appended to the ledger, in
completion order; writes completing while it is in flight wait for the next flush. So
the ledger lists exactly the acknowledged writes, in completion order, and its ack
times are the flushes' completions. With `--fua` every write asks for FUA and is
acknowledged at its own reply; no FLUSH is sent. An export that announces no
SEND_FLUSH (or no SEND_FUA, with --fua) is refused before the ledger is created.
Without FUA, the writer keeps at most iodepth writes in flight and at most iodepth +
flush_every issued but not logged.

It stops after `--count` writes, after `--seconds`, when every block of the export has
been written, on SIGTERM/SIGINT (outstanding replies are still collected, then the
final flush), at the first write or flush the server refuses (reason write_error, the
error names the write or the flush; after a failed flush nothing held is logged), or
when the connection is lost (held, unflushed writes are not acknowledged). Losing the
connection is how a drill ends when the primary's site is crashed, so it is a clean
stop: the reason is recorded in the ledger and the exit status is 0.

Ledger: one JSON object per line, append-only, each line flushed to the OS as written
and fsynced every `--fsync-every` acknowledgements and at the end:

    {"event": "start", "format": "replicator-drill-ledger/1", "run_id": ..., "block_size":
     ..., "iodepth": ..., "fua": bool, "flush_every": n (null with FUA), "order":
     {"nblocks": n, "a": a, "b": b}, "time": ..., ...}
    {"event": "ack", "index": i, "offset": byte offset, "hash": BLAKE2b-128 of the block,
     "time": wall-clock seconds (when the covering flush or the FUA write completed)}
    ...
    {"event": "end", "reason": "count|seconds|exhausted|signal|connection_lost|
     write_error|protocol_error", "issued": n, "completed": n (write replies without
     error), "acknowledged": n, "flushes": n, "error": ..., "time": ...}

The format stays version 1: ledgers written before flushes existed have no
flush_every (read as 0: each write was logged at its reply, which was durable then).
A writer killed outright leaves no end line, possibly a last line without its newline:
the checker ignores such a partial line (that write counts as unacknowledged) and says
the ledger was truncated.

Checker (`check`, `check` command). Reads each acknowledged write's block from a
volume image (file or block device) and compares its hash: `present` or `missing`;
missing acknowledged writes are the RPO in writes (`rpo_writes_lost`), the smallest
missing index is `first_missing_index`. Writes that were issued but not acknowledged
(in flight, or completed but not yet flushed, when the primary died) may legitimately
be present: each block of the order up to the number issued (from the end line, or
bounded by acknowledged + iodepth + flush_every + 1 when there is none) that is not
acknowledged is compared with its expected content and counted in
`unacknowledged_present`. With iodepth 1, write order is known, so the checker also
says whether the present writes form a prefix of it (`prefix`; `holes` counts missing
writes followed by a present one); with deeper queues the server may have applied
in-flight writes in any order, so `prefix` and `holes` are null.

The RPO in seconds, `rpo_seconds`: the time from the recovery point to the last
acknowledgement in the ledger (the last one before `--acked-before`, if given). The
recovery point is the acknowledgement just before the first missing one in ledger
order (the run's start when the first is missing): every write acknowledged up to it
is on the image, and writes acknowledged after it, up to the end, are (some or all)
lost. 0 when nothing is missing. `loss_window_seconds` (kept as it was) is the time
from the acknowledgement of the first missing write to the last acknowledgement, so
it reads 0 when only the last flush's writes are lost; rpo_seconds then spans the
flush interval before them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

from replicator.drill import block
from replicator.drill.nbd_client import NbdClient, NbdError, strerror, tls_context

FORMAT = "replicator-drill-ledger/1"
FLUSH_EVERY = 8  # default: a FLUSH after every 8 completed writes
FLUSH_COOKIE = (1 << 64) - 1  # never a write's cookie (write i has cookie i < nblocks)
EXIT_OK, EXIT_ERROR, EXIT_LOST = 0, 1, 3
_LISTED = 1000   # at most this many indices listed per category in a check result
_DETAILED = 20   # at most this many missing writes described


class LedgerError(Exception):
    """A ledger that cannot be written or read back."""


class Ack(NamedTuple):
    index: int
    offset: int
    hash: str
    time: float


# --- the ledger file ---------------------------------------------------------------

class LedgerFile:
    """Append side of a ledger: created exclusively (a run never overwrites evidence)."""

    def __init__(self, path: str, header: dict, fsync_every: int = 100):
        self.path = path
        self.fsync_every = fsync_every
        self._unsynced = 0
        try:
            self._f = open(path, "x", encoding="utf-8")
        except OSError as exc:
            raise LedgerError(f"cannot create ledger {path}: {exc}") from exc
        self._append({"event": "start", "format": FORMAT, **header}, sync=True)

    def ack(self, index: int, offset: int, hash_: str) -> None:
        self._append({"event": "ack", "index": index, "offset": offset, "hash": hash_,
                      "time": round(time.time(), 6)},
                     sync=self._unsynced + 1 >= self.fsync_every)

    def end(self, **fields) -> None:
        self._append({"event": "end", **fields, "time": round(time.time(), 6)}, sync=True)

    def close(self) -> None:
        self._f.close()

    def _append(self, record: dict, sync: bool) -> None:
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()
            self._unsynced += 1
            if sync:
                os.fsync(self._f.fileno())
                self._unsynced = 0
        except OSError as exc:
            raise LedgerError(f"cannot append to ledger {self.path}: {exc}") from exc


@dataclass
class Ledger:
    header: dict
    acks: list[Ack]
    end: dict | None
    truncated: bool

    @property
    def run_id(self) -> bytes:
        return bytes.fromhex(self.header["run_id"])

    @property
    def order(self) -> block.Order:
        o = self.header["order"]
        return block.Order(o["nblocks"], o["a"], o["b"])


def read_ledger(path: str) -> Ledger:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from exc
    lines = raw.split(b"\n")
    truncated = lines[-1] != b""  # the writer died in the middle of a line
    lines = lines[:-1]
    if not lines:
        raise LedgerError(f"{path}: no start record")
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise LedgerError(f"{path}:{n}: not a JSON record") from None
        if not isinstance(record, dict):
            raise LedgerError(f"{path}:{n}: not a JSON object")
        records.append(record)
    header, end = records[0], None
    if header.get("event") != "start" or header.get("format") != FORMAT:
        raise LedgerError(f"{path}:1: not a {FORMAT} start record")
    try:
        bytes.fromhex(header["run_id"])
        block.check_block_size(header["block_size"])
        if header["iodepth"] < 1:
            raise ValueError("iodepth < 1")
        if header.get("flush_every") is not None and header["flush_every"] < 1:
            raise ValueError("flush_every < 1")
        o = header["order"]
        block.Order(o["nblocks"], o["a"], o["b"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerError(f"{path}:1: bad start record: {exc}") from None
    acks, seen = [], set()
    for n, record in enumerate(records[1:], 2):
        if end is not None:
            raise LedgerError(f"{path}:{n}: record after the end record")
        event = record.get("event")
        if event == "end":
            end = record
        elif event == "ack":
            try:
                ack = Ack(int(record["index"]), int(record["offset"]), str(record["hash"]),
                          float(record["time"]))
            except (KeyError, TypeError, ValueError):
                raise LedgerError(f"{path}:{n}: bad ack record") from None
            if ack.index in seen:
                raise LedgerError(f"{path}:{n}: write {ack.index} acknowledged twice")
            seen.add(ack.index)
            acks.append(ack)
        else:
            raise LedgerError(f"{path}:{n}: unknown event {event!r}")
    return Ledger(header, acks, end, truncated)


# --- the writer ------------------------------------------------------------------

@dataclass
class WorkloadResult:
    reason: str
    issued: int
    acknowledged: int
    seconds: float
    error: str | None
    run_id: str
    ledger: str
    completed: int = 0   # write replies without error (acknowledged or not)
    flushes: int = 0     # FLUSH requests sent


def run_workload(client: NbdClient, ledger_path: str, *, count: int | None = None,
                 seconds: float | None = None, block_size: int = 4096, iodepth: int = 1,
                 seed: int = 0, shuffle: bool = True, fsync_every: int = 100,
                 fua: bool = False, flush_every: int = FLUSH_EVERY,
                 stop: Callable[[], bool] = lambda: False,
                 server: str = "") -> WorkloadResult:
    """Write the workload through `client`, logging acknowledged (flushed, or FUA)
    writes to a new ledger. Raises ValueError (before creating the ledger) for a
    workload the export cannot take, LedgerError when the ledger cannot be written."""
    block.check_block_size(block_size)
    if block_size % client.min_block or block_size > client.max_block:
        raise ValueError(f"block size {block_size} does not fit the export's constraints "
                         f"(minimum {client.min_block}, maximum {client.max_block})")
    if client.read_only:
        raise ValueError(f"export {client.export!r} is read-only")
    if fua and not client.can_fua:
        raise ValueError(f"export {client.export!r} does not accept FUA")
    if not fua and not client.can_flush:
        raise ValueError(f"export {client.export!r} does not accept FLUSH (no "
                         f"NBD_FLAG_SEND_FLUSH): the writer could not tell which writes "
                         f"are durable" + (" (try --fua)" if client.can_fua else ""))
    if iodepth < 1:
        raise ValueError("iodepth must be at least 1")
    if flush_every < 1:
        raise ValueError("flush_every must be at least 1")
    nblocks = client.size // block_size
    if nblocks < 1:
        raise ValueError(f"export {client.export!r} ({client.size} bytes) is smaller than "
                         f"one block")
    if count is not None and not 0 < count <= nblocks:
        raise ValueError(f"count {count} is not within 1..{nblocks}, the blocks of the "
                         f"export (each is written once per run)")
    order = block.Order.shuffled(nblocks, seed) if shuffle else block.Order.sequential(nblocks)
    run_id = os.urandom(16)
    ledger = LedgerFile(ledger_path, {
        "run_id": run_id.hex(), "time": round(time.time(), 6), "pid": os.getpid(), "server": server,
        "export": client.export, "export_size": client.size, "block_size": block_size,
        "iodepth": iodepth, "fua": fua, "flush_every": None if fua else flush_every,
        "seed": seed, "shuffled": shuffle,
        "order": {"nblocks": nblocks, "a": order.a, "b": order.b},
        "count": count, "seconds": seconds}, fsync_every)

    limit = count if count is not None else nblocks
    # Without FUA at most iodepth writes in flight and at most iodepth + flush_every
    # issued but not yet logged (in flight, or completed and waiting for a flush): the
    # checker's bound on the writes a killed writer may have issued (`check`).
    unlogged_limit = iodepth if fua else iodepth + flush_every
    started = time.monotonic()
    deadline = started + seconds if seconds is not None else None
    inflight: dict[int, tuple[int, str]] = {}
    # Completed writes not yet logged, in completion order: the first `covered` of them
    # had completed when the FLUSH in flight (if `flushing`) was sent.
    held: list[tuple[int, int, str]] = []
    covered, flushing, flush_failed = 0, False, False
    issued = completed = acknowledged = flushes = 0
    reason = error = None

    def maybe_flush() -> None:
        """FLUSH every flush_every completions, and once more before stopping for the
        rest; it covers every write held now."""
        nonlocal flushing, covered, flushes
        if (held and not flushing and not flush_failed
                and (len(held) >= flush_every or (reason is not None and not inflight))):
            client.send_flush(FLUSH_COOKIE)
            flushing, covered = True, len(held)
            flushes += 1

    try:
        try:
            while True:
                maybe_flush()  # the commit comes before the next write
                while (reason is None and len(inflight) < iodepth
                       and len(inflight) + len(held) < unlogged_limit):
                    if stop():
                        reason = "signal"
                    elif issued >= limit:
                        reason = "count" if count is not None else "exhausted"
                    elif deadline is not None and time.monotonic() >= deadline:
                        reason = "seconds"
                    else:
                        offset = order.block(issued) * block_size
                        data = block.encode(run_id, issued, offset, block_size)
                        client.send_write(issued, offset, data, fua)
                        inflight[issued] = (offset, block.digest(data))
                        issued += 1
                maybe_flush()  # the writer stops: the final flush
                if not inflight and not flushing:
                    break
                cookie, err = client.recv_reply()
                if cookie == FLUSH_COOKIE and flushing:
                    flushing = False
                    if err:  # none of the held writes is known durable: none is logged
                        flush_failed = True
                        if error is None:
                            reason = "write_error"
                            error = (f"flush {flushes} (covering {covered} completed "
                                     f"writes): {strerror(err)}")
                        continue
                    for index, offset, hash_ in held[:covered]:
                        ledger.ack(index, offset, hash_)
                    acknowledged += covered
                    del held[:covered]
                    covered = 0
                    continue
                if cookie not in inflight:
                    raise NbdError(f"reply to a request never sent (cookie {cookie})")
                offset, hash_ = inflight.pop(cookie)
                if err:  # refused: not acknowledged; stop issuing, collect the rest
                    if error is None:
                        reason = "write_error"
                        error = f"write {cookie} at offset {offset}: {strerror(err)}"
                    continue
                completed += 1
                if fua:  # FUA: durable at its own reply
                    ledger.ack(cookie, offset, hash_)
                    acknowledged += 1
                else:
                    held.append((cookie, offset, hash_))
        except OSError as exc:  # the socket: reset, closed, unreachable or timed out
            reason, error = "connection_lost", str(exc) or type(exc).__name__
        except NbdError as exc:
            reason, error = "protocol_error", str(exc)
        ledger.end(reason=reason, issued=issued, completed=completed,
                   acknowledged=acknowledged, flushes=flushes, error=error)
    finally:
        ledger.close()
    return WorkloadResult(reason, issued, acknowledged, round(time.monotonic() - started, 3),
                          error, run_id.hex(), ledger_path, completed, flushes)


# --- the checker -----------------------------------------------------------------

def check(ledger_path: str, image_path: str, acked_before: float | None = None) -> dict:
    """Compare a volume image with a ledger; see the module docstring for the fields.
    With `acked_before` (epoch seconds), writes acknowledged later count as in flight: an
    image taken at that instant while the workload went on (a drill's copy) may or may
    not hold them."""
    led = read_ledger(ledger_path)
    logged = len(led.acks)
    if acked_before is not None:
        led.acks = [ack for ack in led.acks if ack.time <= acked_before]
    bs, iodepth = led.header["block_size"], led.header["iodepth"]
    order, run_id = led.order, led.run_id
    try:
        fd = os.open(image_path, os.O_RDONLY)
    except OSError as exc:
        raise LedgerError(f"cannot open image {image_path}: {exc}") from exc
    try:
        def read(offset: int) -> bytes:
            return os.pread(fd, bs, offset)

        missing: list[Ack] = []
        details = []
        present_indices = []
        recovery_point = None  # position in the ledger of the first missing write
        for position, ack in enumerate(led.acks):
            if not 0 <= ack.index < order.nblocks or ack.offset != order.block(ack.index) * bs:
                raise LedgerError(f"{ledger_path}: write {ack.index} logged at offset "
                                  f"{ack.offset}, which is not where the run's order puts it")
            data = read(ack.offset)
            if len(data) == bs and block.digest(data) == ack.hash:
                present_indices.append(ack.index)
                continue
            missing.append(ack)
            if recovery_point is None:
                recovery_point = position
            if len(details) < _DETAILED:
                details.append({"index": ack.index, "offset": ack.offset,
                                "acknowledged_at": ack.time, "found": _describe(data, bs, run_id)})

        acked = {ack.index for ack in led.acks}
        if led.end is not None:
            issued = int(led.end.get("issued", 0))
        else:
            # The writer keeps at most iodepth writes in flight and, between flushes, at
            # most iodepth + flush_every issued but unlogged (flush_every is null with FUA
            # and absent from ledgers older than it: each write logged at its reply); +1
            # spares a write whose ack line was being written. Checking beyond what was
            # issued costs a read: a block never written cannot hold this run's write.
            issued = logged + iodepth + (led.header.get("flush_every") or 0) + 1
        unacked_present = []
        for index in range(min(issued, order.nblocks)):
            if index not in acked:
                offset = order.block(index) * bs
                if read(offset) == block.encode(run_id, index, offset, bs):
                    unacked_present.append(index)
    finally:
        os.close(fd)

    prefix = holes = None
    if iodepth == 1:
        present = sorted(present_indices + unacked_present)
        prefix = present == list(range(len(present)))
        last_present = present[-1] if present else -1
        holes = sum(1 for ack in missing if ack.index < last_present)
    missing_indices = sorted(ack.index for ack in missing)
    window = rpo_seconds = 0.0
    if missing:
        last = led.acks[-1].time
        window = round(last - missing[0].time, 6)
        # every write acknowledged up to the recovery point is present; the writes
        # acknowledged after it, up to the last acknowledgement, are (some or all) lost
        if recovery_point:
            since = led.acks[recovery_point - 1].time
        else:  # the first acknowledged write is missing: lost since the run began
            since = float(led.header.get("time", led.acks[0].time))
        rpo_seconds = round(max(0.0, last - since), 6)
    return {
        "ledger": ledger_path,
        "image": image_path,
        "run_id": run_id.hex(),
        "block_size": bs,
        "iodepth": iodepth,
        "flush_every": led.header.get("flush_every"),
        "fua": bool(led.header.get("fua")),
        "writer_stopped": led.end.get("reason") if led.end else None,
        "ledger_truncated": led.truncated,
        "acknowledged": len(led.acks),
        "acked_before": acked_before,
        "present": len(present_indices),
        "missing": len(missing),
        "rpo_writes_lost": len(missing),
        "first_missing_index": missing_indices[0] if missing_indices else None,
        "missing_indices": missing_indices[:_LISTED],
        "missing_details": details,
        "unacknowledged_present": len(unacked_present),
        "unacknowledged_present_indices": unacked_present[:_LISTED],
        "prefix": prefix,
        "holes": holes,
        "loss_window_seconds": window,
        "rpo_seconds": rpo_seconds,
    }


def _describe(data: bytes, bs: int, run_id: bytes) -> str:
    """What an image holds where an acknowledged write is missing."""
    if len(data) < bs:
        return "beyond the end of the image"
    if not any(data):
        return "zeros"
    found = block.decode(data)
    if found is None:
        return "other data (not an intact drill block)"
    run = "this run" if found.run_id == run_id else f"run {found.run_id.hex()}"
    return f"write {found.index} of {run}"


# --- command line ----------------------------------------------------------------

def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _nbd_address(text: str) -> tuple[str, int] | str:
    return text if text.startswith("/") else _host_port(text)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m replicator.drill.ledger",
        description="DR drill workload: write self-describing blocks over NBD, logging "
                    "every acknowledged write (covered by a completed FLUSH, or FUA); "
                    "check a volume image against the log.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the workload and its ledger",
                       description="Exit 0 when stopped by count, time, signal, a full "
                                   "export or a lost connection; 1 on an error.")
    w.add_argument("--nbd", required=True, type=_nbd_address, metavar="HOST:PORT|SOCKET",
                   help="the agent's NBD server: an address, or its unix socket's path")
    w.add_argument("--tls-certificates", metavar="DIR",
                   help="NBD over TLS with the client certificate in DIR (ca-cert.pem, "
                        "client-cert.pem, client-key.pem: `replicator pki issue --client`)")
    w.add_argument("--export", required=True, help="export name")
    w.add_argument("--ledger", required=True, help="ledger file to create (must not exist)")
    limit = w.add_mutually_exclusive_group()
    limit.add_argument("--count", type=_positive(int), help="number of writes")
    limit.add_argument("--seconds", type=_positive(float), help="stop issuing after this long")
    w.add_argument("--block-size", type=_positive(int), default=4096)
    w.add_argument("--iodepth", type=_positive(int), default=1, help="writes in flight (1)")
    w.add_argument("--seed", type=int, help="seed of the write order (default: random)")
    w.add_argument("--order", choices=("shuffled", "sequential"), default="shuffled")
    w.add_argument("--fsync-every", type=_positive(int), default=100, metavar="N",
                   help="fsync the ledger every N acknowledgements (100) and at the end")
    w.add_argument("--flush-every", type=_positive(int), default=FLUSH_EVERY, metavar="N",
                   help=f"send NBD FLUSH after every N completed writes ({FLUSH_EVERY}) and "
                        f"before stopping; a write is acknowledged (logged) once a flush "
                        f"sent after its reply succeeds")
    w.add_argument("--fua", action="store_true",
                   help="ask for durable writes (NBD FUA): each is acknowledged at its own "
                        "reply, no FLUSH is sent")
    w.add_argument("--timeout", type=_positive(float), default=30.0,
                   help="seconds without a reply before the connection counts as lost (30)")
    w.add_argument("--json", action="store_true")
    c = sub.add_parser("check", help="check a volume image against a ledger",
                       description="Exit 0 when no acknowledged write is missing, 3 when "
                                   "some are, 1 on an error.")
    c.add_argument("--ledger", required=True)
    c.add_argument("--image", required=True, help="image file or block device")
    c.add_argument("--acked-before", type=float, metavar="EPOCH",
                   help="only writes acknowledged by then must be present (an image taken "
                        "at that instant while the workload went on)")
    c.add_argument("--json", action="store_true")
    return parser


def _write(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    stopping = []
    previous = {sig: signal.signal(sig, lambda *_: stopping.append(True))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    if isinstance(args.nbd, str):
        server = args.nbd
        if args.tls_certificates:
            raise NbdError("--tls-certificates is for an address: the unix socket is plain")
        connect = functools.partial(NbdClient.connect_unix, server, args.export,
                                    timeout=args.timeout)
    else:
        host, port = args.nbd
        server = f"{host}:{port}"
        tls = tls_context(args.tls_certificates) if args.tls_certificates else None
        connect = functools.partial(NbdClient.connect, host, port, args.export,
                                    timeout=args.timeout, tls=tls)
    try:
        client = connect()
        try:
            result = run_workload(client, args.ledger, count=args.count, seconds=args.seconds,
                                  block_size=args.block_size, iodepth=args.iodepth, seed=seed,
                                  shuffle=args.order == "shuffled",
                                  fsync_every=args.fsync_every, fua=args.fua,
                                  flush_every=args.flush_every,
                                  stop=lambda: bool(stopping), server=server)
        finally:
            client.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"{result.acknowledged} writes acknowledged "
              f"({'FUA' if args.fua else f'flushed, {result.flushes} flushes'}) of "
              f"{result.completed} completed, {result.issued} issued in "
              f"{result.seconds}s, stopped by {result.reason}"
              + (f" ({result.error})" if result.error else "")
              + f"; ledger {result.ledger}, run {result.run_id}")
    return EXIT_ERROR if result.reason in ("write_error", "protocol_error") else EXIT_OK


def _check(args) -> int:
    result = check(args.ledger, args.image, args.acked_before)
    if args.json:
        print(json.dumps(result))
    else:
        prefix = {None: "not judged (iodepth > 1)", True: "yes",
                  False: f"no ({result['holes']} holes)"}[result["prefix"]]
        print(f"ledger {result['ledger']}  run {result['run_id']}  image {result['image']}\n"
              f"acknowledged ({_acknowledged_by(result)}) "
              f"{result['acknowledged']}  present {result['present']}  "
              f"missing {result['missing']} (rpo_writes_lost)\n"
              f"first missing write: {_or_dash(result['first_missing_index'])}  "
              f"RPO: {result['rpo_seconds']}s of acknowledged writes (rpo_seconds)  "
              f"loss window: {result['loss_window_seconds']}s\n"
              f"unacknowledged writes present: {result['unacknowledged_present']}\n"
              f"present writes are a prefix of the write order: {prefix}\n"
              f"writer stopped: {result['writer_stopped'] or 'no end record (killed?)'}"
              + ("  (last ledger line truncated)" if result["ledger_truncated"] else ""))
        for d in result["missing_details"]:
            print(f"  missing write {d['index']} at offset {d['offset']}: found {d['found']}")
    return EXIT_LOST if result["missing"] else EXIT_OK


def _acknowledged_by(result: dict) -> str:
    if result["fua"]:
        return "FUA"
    # ledgers from before flushes logged each write at its reply
    return "flushed" if result["flush_every"] else "at the reply"


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _write(args) if args.command == "write" else _check(args)
    except (LedgerError, NbdError, ValueError, OSError) as exc:
        print(f"{args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
