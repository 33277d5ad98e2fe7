"""The drill's NBD client and workload writer against the product's own NBD server,
in-process on loopback (the integration test drives them against qemu-nbd)."""

import errno
import json
import os
import threading
import time

import pytest

from replicator.drill import ledger
from replicator.drill.nbd_client import NbdClient, NbdError
from tests.nbd_fixtures import MiB, DeferredExport, FileExport, ServerThread


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
def serve():
    """serve({name: export}) -> a started ServerThread; all closed at teardown."""
    servers = []

    def make(exports):
        try:
            srv = ServerThread(exports)
        except BaseException:
            for export in exports.values():
                export.close()
            raise
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


@pytest.fixture
def client():
    """client(server, export) -> a connected NbdClient, closed at teardown."""
    clients = []

    def make(srv, export):
        c = NbdClient.connect("127.0.0.1", srv.port, export, timeout=10)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def data_export(tmp_path, size=MiB, name="data"):
    return {name: FileExport(name, str(tmp_path / f"{name}.img"), size)}


def test_handshake_learns_the_export(tmp_path, serve, client):
    srv = serve({**data_export(tmp_path),
                 "ro": FileExport("ro", str(tmp_path / "ro.img"), MiB, read_only=True)})
    c = client(srv, "data")
    assert c.size == MiB and not c.read_only and c.can_fua
    assert c.min_block >= 1 and c.max_block >= 4096
    assert client(srv, "ro").read_only


def test_unknown_export_is_refused_with_the_servers_message(tmp_path, serve):
    srv = serve(data_export(tmp_path))
    with pytest.raises(NbdError, match="unknown export.*data"):
        NbdClient.connect("127.0.0.1", srv.port, "nope", timeout=10)


@pytest.mark.parametrize("iodepth", [1, 4])
def test_workload_lands_as_logged(tmp_path, serve, client, iodepth):
    srv = serve(data_export(tmp_path))
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


def test_out_of_order_replies_are_matched_by_cookie(tmp_path, serve, client):
    export = DeferredExport("data", str(tmp_path / "data.img"), MiB)
    srv = serve({"data": export})
    led = str(tmp_path / "ledger")
    c = client(srv, "data")
    done = []
    writer = threading.Thread(target=lambda: done.append(
        ledger.run_workload(c, led, count=32, iodepth=8, seed=1)))
    writer.start()
    deadline = time.monotonic() + 20
    try:
        while writer.is_alive() and time.monotonic() < deadline:
            outstanding, calls = srv.call(lambda: (export.outstanding, export.calls))
            if outstanding >= 8 or (calls == 32 and outstanding):
                srv.call(export.release, calls)      # complete them in a shuffled order
            writer.join(0.002)
    finally:
        srv.call(export.release)
        writer.join(10)
    assert done[0].acknowledged == 32 and export.most_outstanding == 8
    with open(led) as f:
        acked = [r["index"] for r in map(json.loads, f) if r["event"] == "ack"]
    assert sorted(acked) == list(range(32)) and acked != sorted(acked)
    assert ledger.check(led, str(tmp_path / "data.img"))["missing"] == 0


def test_refused_write_stops_the_run_unlogged(tmp_path, serve, capsys):
    srv = serve({"data": FailingExport("data", str(tmp_path / "data.img"), MiB, good=10)})
    led = str(tmp_path / "ledger")
    rc = ledger.main(["write", "--nbd", f"127.0.0.1:{srv.port}", "--export", "data",
                      "--ledger", led, "--count", "50", "--iodepth", "3", "--json"])
    assert rc == 1
    result = json.loads(capsys.readouterr().out)
    assert result["reason"] == "write_error" and "EIO" in result["error"]
    assert result["acknowledged"] == 10 and result["issued"] <= 13
    r = ledger.check(led, str(tmp_path / "data.img"))
    assert r["acknowledged"] == r["present"] == 10 and r["writer_stopped"] == "write_error"


def test_stops_on_request_on_time_and_when_the_export_is_full(tmp_path, serve, client):
    srv = serve(data_export(tmp_path, size=64 * 1024))     # 16 blocks of 4 KiB
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


def test_impossible_workloads_are_refused_before_the_ledger_exists(tmp_path, serve, client):
    srv = serve({**data_export(tmp_path, size=64 * 1024),
                 "ro": FileExport("ro", str(tmp_path / "ro.img"), MiB, read_only=True)})
    led = str(tmp_path / "ledger")
    for export, kwargs in [("ro", {}), ("data", {"count": 17}), ("data", {"block_size": 1000}),
                           ("data", {"block_size": 128 * 1024})]:
        with pytest.raises(ValueError):
            ledger.run_workload(client(srv, export), led, **kwargs)
        assert not os.path.exists(led)


def test_command_line_errors(tmp_path, serve, capsys):
    srv = serve(data_export(tmp_path))
    led = tmp_path / "ledger"
    led.write_text("an earlier run\n")
    args = ["write", "--nbd", f"127.0.0.1:{srv.port}", "--export", "data", "--count", "5"]
    assert ledger.main(args + ["--ledger", str(led)]) == 1             # never overwritten
    assert led.read_text() == "an earlier run\n"
    assert ledger.main(args + ["--ledger", str(tmp_path / "x"), "--export", "nope"]) == 1
    assert "unknown export" in capsys.readouterr().err
    assert ledger.main(args + ["--ledger", str(tmp_path / "y")]) == 0
    assert "5 writes acknowledged" in capsys.readouterr().out
