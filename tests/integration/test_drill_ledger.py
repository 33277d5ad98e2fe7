"""The drill's workload writer and checker against a real NBD server: qemu-nbd serving
a temporary image file on loopback. The writer runs as its own process, as in a drill;
the server is stopped or killed by the PID this test started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from replicator.drill import ledger
from replicator.drill.nbd_client import NbdClient
from tests.agents import free_port, wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20
BS = 4096


@dataclass
class QemuNbd:
    proc: subprocess.Popen
    port: int
    export: str
    image: str
    log: str

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            with open(self.log) as f:
                raise AssertionError(f"qemu-nbd exited {self.proc.returncode}: {f.read()}")
        NbdClient.connect("127.0.0.1", self.port, self.export, timeout=5).close()
        return True

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)


@pytest.fixture
def qemu_nbd(tmp_path):
    """qemu_nbd(size) -> a started QemuNbd serving a new zeroed image; every server is
    killed at teardown, even when the test failed."""
    servers: list[QemuNbd] = []

    def start(size: int = 4 * MiB, export: str = "vol") -> QemuNbd:
        image = str(tmp_path / f"{export}.img")
        with open(image, "wb") as f:
            f.truncate(size)
        port = free_port()
        log = str(tmp_path / f"qemu-nbd-{port}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-p", str(port),
                                     "-b", "127.0.0.1", "-x", export, image],
                                    stdout=out, stderr=subprocess.STDOUT)
        server = QemuNbd(proc, port, export, image, log)
        servers.append(server)
        wait_until(server.answers, 20, f"qemu-nbd on port {port} to serve {export}")
        return server

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


@pytest.fixture
def writers():
    """writers(cmd) -> Popen of a writer process; any still running is killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "replicator.drill.ledger", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def write_args(server: QemuNbd, led: str, *extra: str) -> list[str]:
    return ["write", "--nbd", f"127.0.0.1:{server.port}", "--export", server.export,
            "--ledger", led, "--json", *extra]


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, dict]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return proc.returncode, json.loads(out)
    except ValueError:
        raise AssertionError(f"exit {proc.returncode}, no JSON:\n{out}\n{err}") from None


def check(led: str, image: str) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, "-m", "replicator.drill.ledger", "check", "--ledger",
                        led, "--image", image, "--json"], capture_output=True, text=True,
                       timeout=60)
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"check exited {p.returncode}:\n{p.stdout}\n{p.stderr}") from None


def acks(led: str) -> list[dict]:
    with open(led) as f:
        return [r for r in map(json.loads, f) if r["event"] == "ack"]


def ack_lines(led: str) -> int:
    try:
        with open(led) as f:
            return sum('"event":"ack"' in line for line in f)
    except FileNotFoundError:
        return 0


def test_acknowledged_writes_are_on_the_volume_and_a_zeroed_one_is_reported(
        tmp_path, qemu_nbd, writers):
    server = qemu_nbd()
    led = str(tmp_path / "ledger.jsonl")
    rc, result = finish(writers(write_args(server, led, "--count", "300", "--seed", "11")))
    assert rc == 0, result
    assert (result["reason"], result["issued"], result["acknowledged"]) == ("count", 300, 300)
    server.stop()

    rc, r = check(led, server.image)
    assert rc == 0, r
    assert r["acknowledged"] == r["present"] == 300
    assert r["rpo_writes_lost"] == 0 and r["prefix"] is True and r["holes"] == 0
    assert r["writer_stopped"] == "count"

    victim = acks(led)[150]
    with open(server.image, "r+b") as f:
        f.seek(victim["offset"])
        f.write(bytes(BS))
    rc, r = check(led, server.image)
    assert rc == 3
    assert r["rpo_writes_lost"] == 1 and r["missing_indices"] == [150]
    assert r["first_missing_index"] == 150
    assert r["prefix"] is False and r["holes"] == 1
    assert r["missing_details"][0]["found"] == "zeros"


def test_pipelined_writes(tmp_path, qemu_nbd, writers):
    server = qemu_nbd()
    led = str(tmp_path / "ledger.jsonl")
    rc, result = finish(writers(write_args(server, led, "--count", "1024", "--iodepth", "8")))
    assert rc == 0 and result["acknowledged"] == 1024, result   # every block of the image
    server.stop()
    rc, r = check(led, server.image)
    assert rc == 0 and r["present"] == 1024 and r["prefix"] is None, r


@pytest.mark.parametrize("extra, flush_every", [
    (["--iodepth", "4", "--flush-every", "3"], 3),
    (["--iodepth", "2", "--fua"], None),
])
def test_flushed_and_fua_writes_against_qemu_nbd(tmp_path, qemu_nbd, writers, extra,
                                                 flush_every):
    server = qemu_nbd()
    led = str(tmp_path / "ledger.jsonl")
    rc, result = finish(writers(write_args(server, led, "--count", "300", *extra)))
    assert rc == 0 and (result["reason"], result["acknowledged"]) == ("count", 300), result
    loaded = ledger.read_ledger(led)
    assert loaded.header["flush_every"] == flush_every
    assert loaded.end["flushes"] == result["flushes"]
    if flush_every is None:
        assert result["flushes"] == 0                    # FUA: each durable at its reply
    else:  # a flush after 3 completions, one in flight, up to 4 writes beside it
        assert 300 // (flush_every + 4) <= result["flushes"] <= 300 // flush_every + 1
    server.stop()
    rc, r = check(led, server.image)
    assert rc == 0 and r["present"] == 300 and r["rpo_seconds"] == 0.0, r


def test_server_killed_mid_run(tmp_path, qemu_nbd, writers):
    server = qemu_nbd(size=64 * MiB)
    led = str(tmp_path / "ledger.jsonl")
    writer = writers(write_args(server, led, "--fsync-every", "10"))
    wait_until(lambda: ack_lines(led) >= 200 or writer.poll() is not None, 60,
               "200 acknowledged writes")
    assert writer.poll() is None, writer.communicate()
    server.stop(signal.SIGKILL)            # the primary's site is lost

    rc, result = finish(writer)
    assert rc == 0, result
    assert result["reason"] == "connection_lost" and result["error"]
    assert result["acknowledged"] >= 200
    loaded = ledger.read_ledger(led)       # intact: every line whole, closed by an end record
    assert not loaded.truncated and loaded.end["reason"] == "connection_lost"
    assert len(loaded.acks) == result["acknowledged"]
    # acknowledged = flushed: 8 writes a flush (the default), one write in flight beside
    # it, so at most iodepth + flush_every issued but not acknowledged
    assert result["acknowledged"] % 8 == 0 and result["flushes"] >= result["acknowledged"] // 8
    assert result["issued"] - result["acknowledged"] <= 1 + 8

    rc, r = check(led, server.image)
    assert rc == 0, r
    assert r["acknowledged"] == r["present"] == result["acknowledged"]
    assert r["unacknowledged_present"] <= result["issued"] - result["acknowledged"]
    assert r["prefix"] is True
    assert r["writer_stopped"] == "connection_lost"


def test_sigterm_stops_the_writer_cleanly(tmp_path, qemu_nbd, writers):
    server = qemu_nbd(size=64 * MiB)
    led = str(tmp_path / "ledger.jsonl")
    writer = writers(write_args(server, led, "--iodepth", "4"))
    wait_until(lambda: ack_lines(led) >= 100 or writer.poll() is not None, 60,
               "100 acknowledged writes")
    writer.send_signal(signal.SIGTERM)
    rc, result = finish(writer)
    assert rc == 0 and result["reason"] == "signal", result
    assert result["issued"] == result["acknowledged"]     # in-flight replies collected
    assert os.path.getsize(led) > 0
    rc, r = check(led, server.image)
    assert rc == 0 and r["present"] == result["acknowledged"], r
    assert r["writer_stopped"] == "signal"
