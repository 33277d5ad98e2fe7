"""Agents as separate processes on loopback, written to by real NBD clients."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from tests.agents import MiB, wait_until
from tests.clients import fio, qemu_io, run

pytestmark = pytest.mark.integration


def write_patterns(agent, volumes=("data", "log")):
    """Interleaved writes to two volumes of one group, with overlaps and zeroing."""
    for i, vol in enumerate(volumes * 3):
        qemu_io(agent.nbd_uri(vol),
                f"write -P {0x11 + i} {i * 64}k 192k",
                f"write -P {0x41 + i} {1024 + i * 300}k 4k",
                f"write -z {i * 64 + 128}k 16k",
                f"discard {2048 + i * 128}k 64k")


def test_cascade_three_nodes(topology):
    topo = topology(["dc1", "dc2", "dc3"], [("dc1", "dc2", "sync"), ("dc2", "dc3", "async")])
    wait_until(lambda: topo["dc1"].target("db", "dc2")["state"] == "replicating", 20,
               "dc1 -> dc2 replicating")
    write_patterns(topo["dc1"])
    fio(topo["dc1"].nbd_uri("data"), size="8M", extra=["--number_ios=2000"])
    seq = topo.wait_converged()
    assert seq > 2000
    topo.assert_identical()
    mid = topo["dc2"].group("db")
    assert mid["role"] == "secondary" and mid["upstream"]["source"] == "dc1"
    assert topo["dc2"].target("db", "dc3")["acked_seq"] == seq
    assert topo["dc1"].target("db", "dc2")["lag_records"] == 0


def test_fan_out_one_to_two_with_compression(topology):
    topo = topology(["p", "s1", "s2"], [("p", "s1", "async"), ("p", "s2", "async", "zstd")])
    write_patterns(topo["p"])
    fio(topo["p"].nbd_uri("log"), size="4M", extra=["--number_ios=1000"])
    topo.wait_converged()
    topo.assert_identical()
    s2 = topo["p"].target("db", "s2")
    assert s2["compress"] == "zstd" and s2["state"] == "replicating"


def test_sync_write_is_on_target_when_the_client_returns(topology):
    topo = topology(["a", "b"], [("a", "b", "sync")])
    wait_until(lambda: topo["a"].target("db", "b")["in_sync"], 20, "b in sync")
    target_file = topo["b"].volume_path("db", "data")
    for i in range(20):
        pattern = 0x20 + i
        qemu_io(topo["a"].nbd_uri("data"), f"write -P {pattern} {i * 8}k 4k")
        with open(target_file, "rb") as f:  # no waiting: the write has returned
            f.seek(i * 8 * 1024)
            assert f.read(4096) == bytes([pattern]) * 4096, f"write {i} not on target"
    # the batches went out while the primary's own fdatasync ran, not after it
    assert topo["a"].target("db", "b")["early_batches"] > 0


def test_async_targets_are_shipped_durable_records_only(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x31 0 64k", "write -P 0x32 1M 64k")
    topo.wait_converged()
    assert topo["a"].target("db", "b")["early_batches"] == 0


def test_replica_exports_are_read_only(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x5a 0 64k")
    topo.wait_converged()
    qemu_io(topo["b"].nbd_uri("data"), "read -P 0x5a 0 64k", read_only=True)
    info = json.loads(run(["nbdinfo", "--json", topo["b"].nbd_uri("data")]))
    assert info["exports"][0]["is_read_only"] is True
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", topo["b"].nbd_uri("data")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Permission denied" in p.stderr


def test_kill_primary_during_fio_then_converge(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    a = topo["a"]
    fio_proc = subprocess.Popen(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={a.nbd_uri('data')}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--size=16M", "--runtime=30", "--time_based"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: a.group("db")["seq"] > 3000, 30, "fio to write 3000 records")
        a.kill()
    finally:
        fio_proc.kill()
        fio_proc.wait()
    a.start()
    qemu_io(a.nbd_uri("log"), "write -P 0x77 0 1M")  # still writable after recovery
    topo.wait_converged()
    topo.assert_identical()


def test_kill_target_resumes_without_gap_or_duplicate(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    a, b = topo["a"], topo["b"]
    fio(a.nbd_uri("data"), size="8M", extra=["--number_ios=1500"])
    topo.wait_converged()
    b.kill()
    fio(a.nbd_uri("data"), size="8M", extra=["--number_ios=1500"])
    b.start()  # on the same state directory
    wait_until(lambda: a.target("db", "b")["state"] == "replicating", 30, "b to reconnect")
    seq = topo.wait_converged()
    topo.assert_identical()
    # The target resumed from its own durable position: the primary shipped only what
    # it lacked, and its journal holds one record per seq (recovery checks continuity).
    with open(b.log_path) as f:
        log = f.read()
    assert "resuming after seq" in log
    assert b.group("db")["seq"] == seq


def test_garbage_is_rejected_and_agent_keeps_serving(topology):
    topo = topology(["a", "b"], [("a", "b", "sync")])
    a, b = topo["a"], topo["b"]
    rng = random.Random(7)
    for agent in (a, b):
        for port_key in ("listen", "nbd_listen"):
            port = int(agent.config[port_key].rsplit(":", 1)[1])
            for size in (1, 12, 4096, 1 << 16):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    try:
                        s.sendall(bytes(rng.getrandbits(8) for _ in range(size)))
                        s.shutdown(socket.SHUT_WR)
                        s.settimeout(5)
                        while s.recv(65536):
                            pass
                    except (ConnectionResetError, BrokenPipeError):
                        pass
    qemu_io(a.nbd_uri("data"), "write -P 0x33 0 128k")
    topo.wait_converged()
    topo.assert_identical()
    assert a.proc.poll() is None and b.proc.poll() is None


def test_wrong_source_is_refused(topology, tmp_path):
    topo = topology(["a", "b", "c"], [("a", "b", "async"), ("a", "c", "async")])
    # Reconfigure c to accept only from b: a's shipper must be refused, visibly.
    c = topo["c"]
    c.kill()
    c.config["groups"][0]["source"] = "b"
    c.save_config()
    c.start()
    t = wait_until(lambda: (lambda t: t if t["state"] == "refused" else None)(
        topo["a"].target("db", "c")), 20, "a -> c refused")
    assert "WRONG_SOURCE" in t["last_error"]
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x44 0 64k")
    wait_until(lambda: topo["b"].group("db")["applied_seq"] == topo["a"].group("db")["seq"],
               20, "b still replicating")


def test_status_cli_human_and_json(topology):
    topo = topology(["a", "b"], [("a", "b", "sync")])
    qemu_io(topo["a"].nbd_uri("data"), "write -P 1 0 4k")
    topo.wait_converged()
    out = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "-c",
                          topo["a"].config_path, "--json"], capture_output=True, text=True)
    st = json.loads(out.stdout)
    g = st["groups"][0]
    for key in ("role", "seq", "applied_seq", "targets"):
        assert key in g
    for key in ("state", "mode", "acked_seq", "lag_records", "lag_bytes", "lag_seconds"):
        assert key in g["targets"][0]
    human = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "-c",
                            topo["a"].config_path], capture_output=True, text=True).stdout
    assert "role:primary" in human and "-> b" in human and "replicating" in human
    stopped = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "-c",
                              os.path.join(topo.root, "nonexistent.yml")],
                             capture_output=True, text=True)
    assert stopped.returncode == 2
