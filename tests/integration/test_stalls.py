"""Stalls and resource exhaustion (issue 13, items 8 and 9), on real agents on loopback.

Item 8: a sync target's answers pass through a frame-aware proxy that damages or drops
them: one flipped length bit in an ACK header must not hold sync writes back (the
header has its own checksum), and a sync target that stops acknowledging while its
heartbeats still flow must leave sync within sync_ack_timeout.

Item 9: an agent whose RLIMIT_NOFILE is lowered to a few hundred descriptors gets more
idle anonymous NBD connections than it has descriptors; a real NBD client connected
before them must keep writing, status must answer, the log must stay small, and the
idle connections must be dropped once the handshake timeout expires.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import struct
import subprocess
import threading
import time

import pytest

from replicator.wire import HEADER_SIZE, FrameType
from tests.agents import wait_until

HEARTBEAT_TYPE = int(FrameType.HEARTBEAT)
ACK_TYPE = int(FrameType.ACK)


class FrameProxy:
    """A TCP proxy between a shipper and its target. The shipper's bytes pass as they
    are; the target's answers are cut into frames (type at byte 2 and length at bytes
    4..8 of the header, the same in every protocol version) and passed through
    `self.mutate(type, header, body)`, which returns the bytes to forward (b"": drop)."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mutate = lambda ftype, header, body: header + body
        self.seen: dict[int, int] = {}  # frame type -> frames from the target
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            self._spawn(self._copy, client, server)
            self._spawn(self._frames, server, client)

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        self._hang_up(src, dst)

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = sock.recv(n - len(out))
            if not data:
                raise EOFError
            out += data
        return bytes(out)

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                header = bytearray(self._read(src, HEADER_SIZE))
                ftype = header[2]
                (length,) = struct.unpack_from("<I", header, 4)
                body = self._read(src, length)
                with self._lock:
                    self.seen[ftype] = self.seen.get(ftype, 0) + 1
                out = self.mutate(ftype, header, body)
                if out:
                    dst.sendall(out)
        except (OSError, EOFError):
            pass
        self._hang_up(src, dst)

    @staticmethod
    def _hang_up(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> None:
        """Cut every proxied connection (the shipper reconnects through the proxy)."""
        with self._lock:
            socks = list(self._socks)
        self._hang_up(*socks)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.reset()
        with self._lock:
            threads, socks = list(self._threads), list(self._socks)
        for t in threads:
            t.join(5)
        for s in socks:
            s.close()


@pytest.fixture
def proxied_sync_pair(topology):
    """Agents a -> b (sync), a reaching b through a FrameProxy; yields (topo, proxy)."""
    made = {}

    def make(target_options=None, **agent_keys):
        topo = topology(["a", "b"], [("a", "b", "sync", target_options or {})], start=False,
                        heartbeat_timeout=3.0)
        b_port = int(topo["a"].config["peers"]["b"].rsplit(":", 1)[1])
        proxy = made["proxy"] = FrameProxy(b_port)
        topo["a"].config["peers"]["b"] = f"127.0.0.1:{proxy.port}"
        topo["a"].config.update(agent_keys)
        topo["a"].save_config()
        topo.start()
        topo.wait_converged()
        return topo, proxy

    yield make
    if "proxy" in made:
        made["proxy"].close()


def _writes(uri: str, count: int, pattern: int, timeout: float) -> subprocess.CompletedProcess:
    """`count` 4 KiB writes, one after the other, by one qemu-io process."""
    cmd = ["qemu-io", "-f", "raw"]
    for i in range(count):
        cmd += ["-c", f"write -P {pattern} {i * 4096} 4k"]
    return subprocess.run(cmd + [uri], capture_output=True, text=True, timeout=timeout)


def _log(agent) -> str:
    with open(agent.log_path) as f:
        return f.read()


# ---- item 8: one flipped bit, a silent sync target -------------------------------------

@pytest.mark.parametrize("bit", [14, 16], ids=["+16KiB", "+64KiB"])
def test_flipped_length_bit_in_an_ack_does_not_stall_sync_writes(proxied_sync_pair, bit):
    """Before: the primary waited for a 16 KiB (64 KiB) body, every heartbeat counted
    as part of it, and no sync write completed for minutes while status said in_sync."""
    topo, proxy = proxied_sync_pair()
    a = topo["a"]
    flipped = threading.Event()

    def flip_one_ack(ftype, header, body):
        if ftype == ACK_TYPE and not flipped.is_set():
            header[4 + bit // 8] ^= 1 << (bit % 8)
            flipped.set()
        return header + body

    proxy.mutate = flip_one_ack
    started = time.monotonic()
    try:
        done = _writes(a.nbd_uri("data"), 40, 0x5A, timeout=25)
    except subprocess.TimeoutExpired:
        pytest.fail(f"40 sync writes did not complete in 25s after one flipped bit "
                    f"(flipped: {flipped.is_set()}); a says {a.target('db', 'b')}")
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
    assert flipped.is_set()
    assert time.monotonic() - started < 20
    wait_until(lambda: "frame header crc mismatch" in _log(a), 10, "the damage named in a's log")
    topo.wait_converged()
    topo.assert_identical()


def test_sync_target_that_stops_acknowledging_leaves_sync(proxied_sync_pair):
    """ACKs vanish but heartbeats flow: within sync_ack_timeout the target leaves sync
    (logging; status and log say why) and writes complete again."""
    topo, proxy = proxied_sync_pair(sync_ack_timeout=2)
    a = topo["a"]
    drop = threading.Event()
    proxy.mutate = lambda ftype, header, body: b"" if ftype == ACK_TYPE and drop.is_set() \
        else header + body
    drop.set()
    try:
        done = _writes(a.nbd_uri("data"), 5, 0x33, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sync writes stalled behind a target that never acks: {a.target('db', 'b')}")
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
    t = wait_until(lambda: (t := a.target("db", "b"))["state"] in ("logging", "resyncing")
                   and "sync_ack_timeout" in t["last_error"] and t, 10, "b out of sync")
    assert not t["in_sync"]
    assert "left sync: no ACK for seq" in _log(a)
    # Heartbeats kept flowing the whole time: the link was up, only ACKs were missing.
    assert proxy.seen.get(HEARTBEAT_TYPE, 0) > 0
    drop.clear()
    proxy.reset()  # the resync's final ACK was dropped too: start a clean session
    topo.wait_converged()
    topo.assert_identical()


def test_blocking_sync_target_that_stops_acknowledging_fails_the_waiting_writes(
        proxied_sync_pair):
    """on_disconnect: block: the writes that waited for the silent target fail (EIO)
    instead of hanging; once it acknowledges again, writes complete and it catches up."""
    topo, proxy = proxied_sync_pair({"on_disconnect": "block"}, sync_ack_timeout=2)
    a = topo["a"]
    drop = threading.Event()
    proxy.mutate = lambda ftype, header, body: b"" if ftype == ACK_TYPE and drop.is_set() \
        else header + body
    drop.set()
    try:
        done = _writes(a.nbd_uri("data"), 1, 0x44, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a write hung behind a blocking target that never acks: "
                    f"{a.target('db', 'b')}")
    assert "Input/output error" in done.stdout + done.stderr, done.stdout + done.stderr
    wait_until(lambda: a.group("db")["writes_blocked_by"] == ["b"], 10, "writes blocked by b")
    assert "failed (EIO)" in a.target("db", "b")["last_error"]
    drop.clear()
    proxy.reset()
    done = _writes(a.nbd_uri("data"), 2, 0x45, timeout=60)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
    topo.wait_converged()
    topo.assert_identical()
