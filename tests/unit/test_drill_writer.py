"""The drill's NBD client and workload writer against the product's own NBD server,
in-process on loopback (the integration test drives them against qemu-nbd)."""

import contextlib
import errno
import json
import os
import threading
import time

import pytest

from replicator.drill import ledger
from replicator.drill.nbd_client import NbdClient, NbdError
from tests.nbd_fixtures import MiB, DeferredExport, FileExport, nbd_server  # noqa: F401 (fixture)


class FailingExport(FileExport):
    """Accepts `good` writes, then answers EIO."""

    def __init__(self, *args, good: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.good = good

    def write(self, offset, data, fua, done) -> None:
        if self.good <= 0:
            done(errno.EIO)
            return
        self.good -= 1
        super().write(offset, data, fua, done)


@pytest.fixture
def client():
    """client(server, export, cls=NbdClient) -> a connected client, closed at teardown."""
    clients = []

    def make(srv, export, cls=NbdClient):
        c = cls.connect("127.0.0.1", srv.port, export, timeout=10)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def write(srv, led, capsys, *args) -> tuple[int, dict]:
    """`drill write` of export "data" into ledger `led`: (exit code, its JSON result)."""
    rc = ledger.main(["write", "--nbd", f"127.0.0.1:{srv.port}", "--export", "data",
                      "--ledger", led, *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def data_export(tmp_path, size=MiB, name="data"):
    return {name: FileExport(name, str(tmp_path / f"{name}.img"), size)}


def test_handshake_learns_the_export(tmp_path, nbd_server, client):
    srv = nbd_server({**data_export(tmp_path),
                 "ro": FileExport("ro", str(tmp_path / "ro.img"), MiB, read_only=True)})
    c = client(srv, "data")
    assert c.size == MiB and not c.read_only and c.can_fua
    assert c.min_block >= 1 and c.max_block >= 4096
    assert client(srv, "ro").read_only


def test_unknown_export_is_refused_with_the_servers_message(tmp_path, nbd_server):
    srv = nbd_server(data_export(tmp_path))
    with pytest.raises(NbdError, match="unknown export.*data"):
        NbdClient.connect("127.0.0.1", srv.port, "nope", timeout=10)


@pytest.mark.parametrize("iodepth", [1, 4])
def test_workload_lands_as_logged(tmp_path, nbd_server, client, iodepth):
    srv = nbd_server(data_export(tmp_path))
    led = str(tmp_path / "ledger")
    result = ledger.run_workload(client(srv, "data"), led, count=100, iodepth=iodepth, seed=3)
    assert (result.reason, result.issued, result.acknowledged) == ("count", 100, 100)
    r = ledger.check(led, str(tmp_path / "data.img"))
    assert r["acknowledged"] == r["present"] == 100 and r["missing"] == 0
    assert r["prefix"] is (True if iodepth == 1 else None)
    with open(led) as f:
        records = [json.loads(line) for line in f]
    assert records[0]["iodepth"] == iodepth and records[0]["seed"] == 3
    assert records[-1]["reason"] == "count"


def test_out_of_order_replies_are_matched_by_cookie(tmp_path, nbd_server, client):
    export = DeferredExport("data", str(tmp_path / "data.img"), MiB)
    srv = nbd_server({"data": export})
    led = str(tmp_path / "ledger")
    c = client(srv, "data")
    done = []
    writer = threading.Thread(target=lambda: done.append(   # one flush, at the end
        ledger.run_workload(c, led, count=32, iodepth=8, seed=1, flush_every=32)))
    writer.start()
    deadline = time.monotonic() + 20
    try:
        while writer.is_alive() and time.monotonic() < deadline:
            outstanding, calls = srv.call(lambda: (export.outstanding, export.calls))
            if outstanding >= 8 or (calls >= 32 and outstanding):
                srv.call(export.release, calls)      # complete them in a shuffled order
            writer.join(0.002)
    finally:
        srv.call(export.release)
        writer.join(10)
    assert done[0].acknowledged == 32 and export.most_outstanding == 8
    assert (done[0].flushes, export.calls) == (1, 33)
    with open(led) as f:
        acked = [r["index"] for r in map(json.loads, f) if r["event"] == "ack"]
    assert sorted(acked) == list(range(32)) and acked != sorted(acked)
    assert ledger.check(led, str(tmp_path / "data.img"))["missing"] == 0


def test_refused_write_stops_the_run_unlogged(tmp_path, nbd_server, capsys):
    srv = nbd_server({"data": FailingExport("data", str(tmp_path / "data.img"), MiB, good=10)})
    led = str(tmp_path / "ledger")
    rc, result = write(srv, led, capsys, "--count", "50", "--iodepth", "3")
    assert rc == 1
    assert result["reason"] == "write_error" and "EIO" in result["error"]
    assert result["acknowledged"] == 10 and result["issued"] <= 13
    r = ledger.check(led, str(tmp_path / "data.img"))
    assert r["acknowledged"] == r["present"] == 10 and r["writer_stopped"] == "write_error"


def test_stops_on_request_on_time_and_when_the_export_is_full(tmp_path, nbd_server, client):
    srv = nbd_server(data_export(tmp_path, size=64 * 1024))     # 16 blocks of 4 KiB
    polls = []
    result = ledger.run_workload(client(srv, "data"), str(tmp_path / "a"),
                                 stop=lambda: polls.append(1) or len(polls) > 5)
    assert (result.reason, result.acknowledged) == ("signal", 5)
    result = ledger.run_workload(client(srv, "data"), str(tmp_path / "b"), seconds=0.01,
                                 block_size=512, iodepth=2)
    assert result.reason in ("seconds", "exhausted")
    result = ledger.run_workload(client(srv, "data"), str(tmp_path / "c"))
    assert (result.reason, result.acknowledged) == ("exhausted", 16)
    assert ledger.check(str(tmp_path / "c"), str(tmp_path / "data.img"))["missing"] == 0


def test_impossible_workloads_are_refused_before_the_ledger_exists(tmp_path, nbd_server, client):
    srv = nbd_server({**data_export(tmp_path, size=64 * 1024),
                 "ro": FileExport("ro", str(tmp_path / "ro.img"), MiB, read_only=True)})
    led = str(tmp_path / "ledger")
    for export, kwargs in [("ro", {}), ("data", {"count": 17}), ("data", {"block_size": 1000}),
                           ("data", {"block_size": 128 * 1024})]:
        with pytest.raises(ValueError):
            ledger.run_workload(client(srv, export), led, **kwargs)
        assert not os.path.exists(led)


def test_command_line_errors(tmp_path, nbd_server, capsys):
    srv = nbd_server(data_export(tmp_path))
    led = tmp_path / "ledger"
    led.write_text("an earlier run\n")
    args = ["write", "--nbd", f"127.0.0.1:{srv.port}", "--export", "data", "--count", "5"]
    assert ledger.main(args + ["--ledger", str(led)]) == 1             # never overwritten
    assert led.read_text() == "an earlier run\n"
    assert ledger.main(args + ["--ledger", str(tmp_path / "x"), "--export", "nope"]) == 1
    assert "unknown export" in capsys.readouterr().err
    assert ledger.main(args + ["--ledger", str(tmp_path / "y")]) == 0
    assert "5 writes acknowledged" in capsys.readouterr().out


# --- acknowledged = covered by a completed FLUSH (or FUA) --------------------------

class FlushFailingExport(FileExport):
    """Completes every write at once; `good` flushes succeed, the later ones answer EIO."""

    def __init__(self, *args, good: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.good = good
        self.flushes = 0

    def flush(self, done) -> None:
        self.flushes += 1
        if self.flushes > self.good:
            done(errno.EIO)
        else:
            super().flush(done)


class FlushHoldingExport(FileExport):
    """Completes every write at once and `good` flushes; holds every later flush
    unanswered (`held` counts them)."""

    def __init__(self, *args, good: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.good = good
        self.flushes = 0
        self.held = []

    def flush(self, done) -> None:
        self.flushes += 1
        if self.flushes > self.good:
            self.held.append(done)
        else:
            super().flush(done)


class RecordingClient(NbdClient):
    """The drill's client, recording what the writer sent and received, in order:
    ("write", cookie), ("flush",), ("reply", cookie, errno, ack lines in the ledger when
    the writer asked for this reply). `waiting`: the writer is blocked for a reply."""

    ledger_path = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []
        self.sent = 0
        self.waiting = threading.Event()

    def send_write(self, cookie, offset, data, fua=False):
        self.events.append(("write", cookie))
        super().send_write(cookie, offset, data, fua)
        self.sent += 1

    def send_flush(self, cookie):
        assert cookie == ledger.FLUSH_COOKIE
        self.events.append(("flush",))
        super().send_flush(cookie)
        self.sent += 1

    def recv_reply(self):
        lines = len(logged(self.ledger_path)) if os.path.exists(self.ledger_path) else 0
        self.waiting.set()
        try:
            cookie, err = super().recv_reply()
        finally:
            self.waiting.clear()
        self.events.append(("reply", cookie, err, lines))
        return cookie, err


def logged(path):
    """Indices of the ack lines of a ledger, in order."""
    with open(path) as f:
        return [r["index"] for r in map(json.loads, f) if r.get("event") == "ack"]


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def flushed_writes(events):
    """What the ledger must hold, from what the writer sent and received: on each
    successful flush reply, the writes whose successful replies arrived before that
    flush was sent, in arrival order; and for each reply, how many ack lines there
    must have been when the writer asked for it. Also: how many writes completed while
    a flush was in flight (they wait for the next one)."""
    done, covered, expected, lines_before, meanwhile = [], None, [], [], 0
    for event in events:
        if event[0] == "flush":
            assert covered is None, "two flushes in flight"
            covered, done = done, []
        elif event[0] == "reply":
            _, cookie, err, _lines = event
            lines_before.append(len(expected))
            if cookie == ledger.FLUSH_COOKIE:
                if not err:
                    expected += covered
                covered = None
            elif not err:
                done.append(cookie)
                meanwhile += covered is not None
    return expected, lines_before, meanwhile


@contextlib.contextmanager
def writing(srv, client, led, stop, **workload):
    """The ledger writer on a thread through a RecordingClient of export "data": yields
    (client, thread, [result once it ended]); at the end stop() runs, then the join."""
    c = client(srv, "data", RecordingClient)
    c.ledger_path = led
    done = []
    writer = threading.Thread(target=lambda: done.append(ledger.run_workload(c, led, **workload)))
    writer.start()
    try:
        yield c, writer, done
    finally:
        stop()
        writer.join(10)


def polling(writer, seconds):
    """Yield while the writer runs, within `seconds`, letting it run in between."""
    deadline = time.monotonic() + seconds
    while writer.is_alive() and time.monotonic() < deadline:
        yield
        writer.join(0.002)


def test_a_failed_flush_logs_none_of_the_writes_it_covered(tmp_path, nbd_server, capsys):
    srv = nbd_server({"data": FlushFailingExport("data", str(tmp_path / "data.img"), MiB, good=1)})
    led = str(tmp_path / "ledger")
    rc, result = write(srv, led, capsys, "--count", "40", "--flush-every", "5")
    assert rc == 1
    assert result["reason"] == "write_error" and result["flushes"] == 2
    assert "flush 2" in result["error"] and "EIO" in result["error"], result["error"]
    # flush 1 covered writes 0..4; flush 2 (5..9) failed: the writer stopped, and write
    # 10, sent while flush 2 was in flight, completed but was never flushed
    assert logged(led) == [0, 1, 2, 3, 4] and result["acknowledged"] == 5
    assert (result["completed"], result["issued"]) == (11, 11)
    end = records(led)[-1]
    assert (end["reason"], end["acknowledged"], end["flushes"]) == ("write_error", 5, 2)
    r = ledger.check(led, str(tmp_path / "data.img"))
    assert (r["acknowledged"], r["present"], r["missing"]) == (5, 5, 0)
    assert r["unacknowledged_present_indices"] == list(range(5, 11))  # written, not flushed


def test_a_connection_lost_before_the_flush_reply_logs_none_of_its_writes(
        tmp_path, nbd_server, client):
    export = FlushHoldingExport("data", str(tmp_path / "data.img"), MiB, good=1)
    srv = nbd_server({"data": export})
    led = str(tmp_path / "ledger")
    def cut():
        srv.call(lambda: [conn._transport.abort() for conn in list(srv.server._connections)])
    with writing(srv, client, led, cut, count=200, iodepth=2, flush_every=4) as (c, writer, done):
        # the second flush is held; the writer goes on up to iodepth + flush_every
        # unlogged writes, then waits for the flush's reply (the flush seen held first:
        # the writer's wait is then one it began after sending it)
        for _ in polling(writer, 20):
            if srv.call(lambda: len(export.held)) and c.waiting.is_set():
                break
        else:
            pytest.fail("no held flush")
        cut()
        writer.join(20)
    result = done[0]
    assert result.reason == "connection_lost" and result.flushes == 2
    expected, lines_before, meanwhile = flushed_writes(c.events)
    assert expected == [0, 1, 2, 3] == logged(led)      # flush 1's writes only
    assert result.acknowledged == 4 and result.completed > 4
    assert result.issued - result.acknowledged == 2 + 4   # iodepth + flush_every held back
    r = ledger.check(led, str(tmp_path / "data.img"))
    assert (r["present"], r["missing"], r["writer_stopped"]) == (4, 0, "connection_lost")
    on_image = r["unacknowledged_present"]
    assert on_image == result.completed - 4
    # a writer killed outright leaves no end line: the checker's bound still reaches
    # every write it may have issued
    lines = open(led).read().splitlines(keepends=True)
    with open(led, "w") as f:
        f.writelines(lines[:-1])
    r = ledger.check(led, str(tmp_path / "data.img"))
    assert r["writer_stopped"] is None and r["unacknowledged_present"] == on_image


def test_fua_writes_are_acknowledged_at_their_own_reply(tmp_path, nbd_server, client):
    export = DeferredExport("data", str(tmp_path / "data.img"), MiB)
    srv = nbd_server({"data": export})
    led = str(tmp_path / "ledger")
    with writing(srv, client, led, lambda: srv.call(export.release),
                 count=12, iodepth=3, fua=True, seed=5) as (c, writer, done):
        for _ in polling(writer, 20):
            if c.waiting.is_set() and srv.call(lambda: export.calls) == c.sent:
                srv.call(export.release, export.calls)
    result = done[0]
    assert (result.reason, result.acknowledged, result.flushes) == ("count", 12, 0)
    assert export.fua_writes == 12 and export.calls == 12       # no FLUSH sent
    replies = [e for e in c.events if e[0] == "reply"]
    assert [e[3] for e in replies] == list(range(12))           # each logged at its reply
    assert logged(led) == [e[1] for e in replies]
    assert records(led)[0]["fua"] is True and records(led)[0]["flush_every"] is None
    assert ledger.check(led, str(tmp_path / "data.img"))["missing"] == 0


def test_iodepth_4_flush_every_3_logs_exactly_the_writes_completed_before_each_flush(
        tmp_path, nbd_server, client):
    export = DeferredExport("data", str(tmp_path / "data.img"), MiB)
    srv = nbd_server({"data": export})
    led = str(tmp_path / "ledger")
    releases = 0
    with writing(srv, client, led, lambda: srv.call(export.release),
                 count=60, iodepth=4, flush_every=3, seed=2) as (c, writer, done):
        for _ in polling(writer, 30):
            # the writer waits for a reply and the server has all it sent: complete
            # everything held (writes and the flush) in a shuffled order
            if c.waiting.is_set() and srv.call(lambda: export.calls) == c.sent:
                releases += srv.call(export.release, releases) > 0
    result = done[0]
    assert (result.reason, result.issued, result.acknowledged) == ("count", 60, 60)
    assert export.most_outstanding >= 5          # 4 writes and a flush at once
    expected, lines_before, meanwhile = flushed_writes(c.events)
    assert logged(led) == expected and sorted(expected) == list(range(60))
    # when the writer asked for each reply, only flushed writes were in the ledger
    assert [e[3] for e in c.events if e[0] == "reply"] == lines_before
    assert meanwhile > 0       # some writes completed during a flush and waited for the next
    assert result.flushes == sum(e[0] == "flush" for e in c.events) >= 60 // (3 + 4)
    assert records(led)[0]["flush_every"] == 3 and records(led)[-1]["flushes"] == result.flushes
    assert ledger.check(led, str(tmp_path / "data.img"))["missing"] == 0


def test_an_export_without_flush_is_refused(tmp_path, nbd_server, client, monkeypatch):
    from replicator.capture import nbd as N
    announce = N.transmission_flags
    monkeypatch.setattr(N, "transmission_flags",
                        lambda export, read_only=False: announce(export, read_only)
                        & ~N.TransmissionFlag.SEND_FLUSH)
    srv = nbd_server(data_export(tmp_path))
    c = client(srv, "data")
    assert not c.can_flush and c.can_fua
    led = str(tmp_path / "ledger")
    with pytest.raises(ValueError, match="does not accept FLUSH.*--fua"):
        ledger.run_workload(c, led, count=4)
    assert not os.path.exists(led)
    with pytest.raises(ValueError, match="FLUSH"):
        c.send_flush(ledger.FLUSH_COOKIE)
    result = ledger.run_workload(c, led, count=4, fua=True)   # FUA needs no FLUSH
    assert (result.acknowledged, result.flushes) == (4, 0)
