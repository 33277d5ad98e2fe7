"""Processing offload (seed 000): a near secondary processes each write for a far
target against the content it overwrites, and the primary relays the result; with real
agents and NBD clients, under faults."""

import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from replicator.drill.nbd_client import NbdClient
from tests.agents import MiB, wait_until
from tests.clients import fio, qemu_io
from tests.integration.test_replication import write_patterns

pytestmark = pytest.mark.integration

ALL = ["delta", "zstd", "checksum"]


def offloaded(topology, process=ALL, **kwargs):
    """a -sync-> b, and a -async-> c processed via b."""
    return topology(["a", "b", "c"], [("a", "b", "sync"),
                                      ("a", "c", "async", {"via": "b", "process": process})],
                    **kwargs)


def test_offloaded_far_link_is_identical_after_fio_and_qemu_io(topology):
    topo = offloaded(topology)
    topo.wait_converged()
    write_patterns(topo["a"])
    fio(topo["a"].nbd_uri("data"), size="8M", extra=["--number_ios=2000"])
    qemu_io(topo["a"].nbd_uri("log"), "write -P 0x5a 0 1M", "write -P 0x5b 4k 4k")
    seq = topo.wait_converged()
    topo.assert_identical()
    off = topo["a"].target("db", "c")["offload"]
    assert off["via"] == "b" and off["process"] == ALL
    assert off["records_processed"] + off["records_direct"] == seq > 2000, off
    assert off["records_processed"] > 0.9 * seq, off
    assert off["path"] == "via b" and off["base_mismatches"] == 0
    assert off["bytes_raw"] > off["bytes_processed"] > 0
    near = wait_until(lambda: (lambda b: b["analytics"] and b["analytics"]["delta_ratio"]
                               and b)(topo["a"].group("db")["tree"]["children"][0]), 10,
                      "b to report the delta ratio of what it processed")
    assert near["node"] == "b" and 0 < near["analytics"]["delta_ratio"] < 1


def test_base_mismatch_on_the_far_replica_is_never_applied_and_is_repaired(topology):
    topo = offloaded(topology)
    a, c = topo["a"], topo["c"]
    qemu_io(a.nbd_uri("data"), "write -P 0x21 12M 64k")
    topo.wait_converged()
    c.stop()  # a clean stop: its volumes hold everything (no replay over what rots next)
    with open(c.volume_path("db", "data"), "r+b") as f:  # c's copy rots under a write
        f.seek(12 * MiB + 8192)
        f.write(b"\xee" * 512)
    c.start()
    topo.wait_converged()
    wait_until(lambda: a.target("db", "c")["offload"]["processing"], 10, "b to process")
    qemu_io(a.nbd_uri("data"), "write -P 0x22 12M 16k")  # processed against b's 0x21
    wait_until(lambda: a.target("db", "c")["offload"]["base_mismatches"] >= 1, 30,
               lambda: f"c to report the base mismatch: {a.target('db', 'c')}")
    topo.wait_converged()
    topo.assert_identical()
    off = a.target("db", "c")["offload"]
    assert off["last_mismatch"]["volume"] == "data"
    assert off["last_mismatch"]["offset"] == 12 * MiB
    assert "not applied" in c.log_tail(200)


def test_near_node_killed_mid_stream_the_far_link_goes_direct_and_converges(topology):
    topo = offloaded(topology)
    a, b, c = topo["a"], topo["b"], topo["c"]
    topo.wait_converged()
    done = threading.Event()

    def kill_b_midway():
        wait_until(lambda: a.target("db", "c")["offload"]["records_processed"] > 500, 60,
                   "the far link to relay processed records")
        b.kill()
        done.set()
    killer = threading.Thread(target=kill_b_midway)
    killer.start()
    fio(a.nbd_uri("data"), size="16M", extra=["--number_ios=8000"])
    killer.join()
    assert done.is_set()

    def c_caught_up():
        seq = a.group("db")["seq"]
        return c.group("db")["applied_seq"] == seq and \
            a.target("db", "c")["state"] == "replicating"
    wait_until(c_caught_up, 60, "c to converge without b")
    topo.assert_identical(["a", "c"])
    off = a.target("db", "c")["offload"]
    assert off["path"] == "direct" and not off["processing"], off
    assert "records now go direct" in a.log_tail(200)
    assert off["records_direct"] > 0 and off["records_processed"] > 500, off
    b.start()
    topo.wait_converged()
    topo.assert_identical()


class Tap:
    """A TCP relay on loopback that keeps every byte one way (client to server)."""

    def __init__(self, port: int):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = port
        self.seen = bytearray()
        self._socks = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # not listening yet: the agent dials again
                client.close()
                continue
            self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, keep):
        try:
            while data := src.recv(1 << 16):
                if keep:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        for s in self._socks:
            s.close()


def test_encrypted_payloads_are_never_readable_on_the_relaying_primary(topology, tmp_path):
    key = tmp_path / "c.key"
    key.write_text(os.urandom(32).hex() + "\n")
    keys = {"link_keys": {"c": str(key)}}
    topo = offloaded(topology, process=["delta", "zstd", "checksum", "encrypt"],
                     node_options={"b": keys, "c": keys}, start=False)
    a = topo["a"]
    taps = {n: Tap(int(a.config["peers"][n].rsplit(":", 1)[1])) for n in ("b", "c")}
    try:
        for n, tap in taps.items():
            a.config["peers"][n] = f"127.0.0.1:{tap.port}"
        a.save_config()
        topo.start()
        topo.wait_converged()
        secret = b"OFFLOADED-SECRET"
        blocks = b"".join(secret + i.to_bytes(4, "little") * 1020 for i in range(64))
        # a first write (its base zeroes, so its delta is the data itself), then a rewrite
        nbd_write(a, "data", 4 * MiB, blocks)
        nbd_write(a, "data", 4 * MiB + 100, secret * 8)
        topo.wait_converged()
        topo.assert_identical()
        off = a.target("db", "c")["offload"]
        assert off["records_processed"] >= 2 and off["path"] == "via b", off
        assert secret in taps["b"].seen  # the near node gets the writes as they are...
        assert secret not in taps["c"].seen  # ...the far one only ciphertext
    finally:
        for tap in taps.values():
            tap.close()


def nbd_write(agent, volume, offset, data):
    client = NbdClient.connect("127.0.0.1", agent.nbd_port, volume)
    try:
        client.send_write(1, offset, data)
        assert client.recv_reply() == (1, 0)
    finally:
        client.close()


def test_cascade_near_node_processes_for_its_own_far_target(topology):
    """Claim 12: the near node ships the processed records on itself."""
    topo = topology(["a", "b", "c"], [("a", "b", "sync"),
                                      ("b", "c", "async", {"process": ALL})])
    topo.wait_converged()
    write_patterns(topo["a"])
    fio(topo["a"].nbd_uri("data"), size="8M", extra=["--number_ios=2000"])
    topo.wait_converged()
    topo.assert_identical()
    off = topo["b"].target("db", "c")["offload"]
    assert off["records_processed"] > 2000 and off["path"] == "processed here", off


class PacedWriter:
    """`rate` 4 KiB writes a second over NBD, nine in ten inside [hot, hot + 1 MiB)."""

    def __init__(self, agent, volume: str, rate: int, hot: int):
        self.client = NbdClient.connect("127.0.0.1", agent.nbd_port, volume)
        self.rate, self.hot = rate, hot
        self.stop = threading.Event()
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.monotonic()
        rng = random.Random(7)
        while not self.stop.is_set():
            due = start + self.written / self.rate
            if time.monotonic() < due:  # the workload's pace, not a wait for a condition
                self.stop.wait(due - time.monotonic())
                continue
            block = rng.randrange(256) if rng.random() < 0.9 else 1024 + rng.randrange(2048)
            offset = self.hot + block * 4096 if block < 256 else block * 4096
            self.client.send_write(self.written + 1, offset, os.urandom(4096))
            assert self.client.recv_reply() == (self.written + 1, 0)
            self.written += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def test_analytics_of_the_whole_tree_reach_the_primary(topology):
    """a -sync-> b -async-> c: b and c compute what a cannot afford to, and a shows both,
    c two hops away, with the rates and the hot range of a known workload."""
    topo = topology(["a", "b", "c"], [("a", "b", "sync"), ("b", "c", "async")])
    a = topo["a"]
    topo.wait_converged()
    with PacedWriter(a, "data", rate=100, hot=8 * MiB) as writer:
        wait_until(lambda: writer.written >= 1300, 60, "13 s of writes")

        def tree():
            return a.group("db")["tree"]

        def reported():
            b = tree()["children"][0]
            c = b["children"][0] if b["children"] else None
            return c is not None and c["analytics"] is not None and \
                c["analytics"]["observed_s"] >= 12 and b
        b = wait_until(reported, 30, "b's report to hold c's")
    for node in (b, b["children"][0]):
        vol = node["analytics"]["volumes"]["data"]
        assert 80 <= vol["writes_per_s"]["10s"] <= 120, (node["node"], vol)
        assert 80 * 4096 <= vol["bytes_per_s"]["10s"] <= 120 * 4096, vol
        assert vol["hot_regions"][0]["offset"] == 8 * MiB, vol
        assert vol["compressibility"] > 0.9  # random data
    topo.wait_converged()
    t = wait_until(lambda: (lambda t: t["children"][0]["children"][0]["lag_records"] == 0
                            and t)(a.group("db")["tree"]), 30, "c's lag to reach 0")
    assert t["node"] == "a" and t["children"][0]["node"] == "b"
    assert t["children"][0]["children"][0]["node"] == "c"
    out = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "--analytics",
                          "-c", a.config_path], capture_output=True, text=True, check=True)
    assert "\n  -> b" in out.stdout and "\n    -> c" in out.stdout, out.stdout
