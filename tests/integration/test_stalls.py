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
    """A TCP proxy between a shipper and its target. Both directions are cut into
    frames (type at byte 2 and length at bytes 4..8 of the header, the same in every
    protocol version); the target's answers pass through `self.mutate(type, header,
    body)`, the shipper's frames through `self.mutate_up`, each returning the bytes to
    forward (b"": drop)."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mutate = lambda ftype, header, body: header + body
        self.mutate_up = lambda ftype, header, body: header + body
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
            self._spawn(self._frames, client, server, True)
            self._spawn(self._frames, server, client, False)

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = sock.recv(n - len(out))
            if not data:
                raise EOFError
            out += data
        return bytes(out)

    def _frames(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                header = bytearray(self._read(src, HEADER_SIZE))
                ftype = header[2]
                (length,) = struct.unpack_from("<I", header, 4)
                body = self._read(src, length)
                if up:
                    out = self.mutate_up(ftype, header, body)
                else:
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

    def make(target_options=None, heartbeat_timeout=3.0, **agent_keys):
        topo = topology(["a", "b"], [("a", "b", "sync", target_options or {})], start=False,
                        heartbeat_timeout=heartbeat_timeout)
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


def _sync_writes_survive(topo, flipped: threading.Event, pattern: int, *, within: float,
                         log_of, named: str) -> None:
    """40 sync writes through a's NBD export complete within `within` seconds although
    the proxy flipped a bit (`flipped` set), the damage is named in `log_of`'s log, and
    the pair converges to identical volumes."""
    a = topo["a"]
    started = time.monotonic()
    try:
        done = _writes(a.nbd_uri("data"), 40, pattern, timeout=25)
    except subprocess.TimeoutExpired:
        pytest.fail(f"40 sync writes did not complete in 25s after one flipped bit "
                    f"(flipped: {flipped.is_set()}); a says {a.target('db', 'b')}")
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
    took = time.monotonic() - started
    assert flipped.is_set() and took < within, f"40 writes took {took:.1f}s"
    wait_until(lambda: named in _log(log_of), 10, f"the damage named in {log_of.node}'s log")
    topo.wait_converged()
    topo.assert_identical()


def _drop_acks(proxy) -> threading.Event:
    """From now on the proxy drops every ACK, until the returned event is cleared."""
    drop = threading.Event()
    proxy.mutate = lambda ftype, header, body: b"" if ftype == ACK_TYPE and drop.is_set() \
        else header + body
    drop.set()
    return drop


# ---- item 8: one flipped bit, a silent sync target -------------------------------------

@pytest.mark.parametrize("bit", [14, 16, None], ids=["+16KiB", "+64KiB", "body"])
def test_flipped_length_bit_in_an_ack_does_not_stall_sync_writes(proxied_sync_pair, bit):
    """Before: the primary waited for a 16 KiB (64 KiB) body, every heartbeat counted
    as part of it, and no sync write completed for minutes while status said in_sync.
    A flipped bit in the body (its seq) is caught by the body CRC, as it always was."""
    topo, proxy = proxied_sync_pair()
    a = topo["a"]
    flipped = threading.Event()

    def flip_one_ack(ftype, header, body):
        if ftype == ACK_TYPE and not flipped.is_set():
            if bit is None:
                body = bytes([body[0] ^ 0x08]) + body[1:]
            else:
                header[4 + bit // 8] ^= 1 << (bit % 8)
            flipped.set()
        return header + body

    proxy.mutate = flip_one_ack
    named = "frame body crc mismatch" if bit is None else "frame header crc mismatch"
    _sync_writes_survive(topo, flipped, 0x5A, within=10, log_of=a, named=named)


def test_flipped_length_bit_in_a_records_header_does_not_stall_sync_writes(proxied_sync_pair):
    """The other way: the target waited for a bogus RECORDS body while the primary's
    heartbeats trickled into it, and the sync write waited for its ACK until the primary
    gave up on heartbeat_timeout (here 10 s; the issue saw batches stall 17-25 s)."""
    topo, proxy = proxied_sync_pair(heartbeat_timeout=10.0)
    b = topo["b"]
    flipped = threading.Event()

    def flip_one_records(ftype, header, body):
        if ftype == int(FrameType.RECORDS) and not flipped.is_set():
            header[5] ^= 0x40  # +16 KiB
            flipped.set()
        return header + body

    proxy.mutate_up = flip_one_records
    _sync_writes_survive(topo, flipped, 0x6B, within=6, log_of=b, named="frame header crc mismatch")


def test_sync_target_that_stops_acknowledging_leaves_sync(proxied_sync_pair):
    """ACKs vanish but heartbeats flow: within sync_ack_timeout the target leaves sync
    (logging; status and log say why) and writes complete again."""
    topo, proxy = proxied_sync_pair()  # the default sync_ack_timeout: 10 s
    a = topo["a"]
    drop = _drop_acks(proxy)
    try:
        done = _writes(a.nbd_uri("data"), 5, 0x33, timeout=30)
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
        proxied_sync_pair, tmp_path):
    """on_disconnect: block: the writes that waited for the silent target fail (EIO)
    instead of hanging; a flush after them waits for the target like new writes do; once
    it acknowledges again, the flush and new writes complete and it catches up."""
    topo, proxy = proxied_sync_pair({"on_disconnect": "block"}, sync_ack_timeout=2)
    a = topo["a"]
    drop = _drop_acks(proxy)
    out = tmp_path / "qemu-io.out"
    with open(out, "w") as f:  # line-buffered: the EIO shows while its close flush waits
        proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", "-c",
                                 "write -P 0x44 0 4k", a.nbd_uri("data")],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Input/output error" in out.read_text(), 20,
                   f"the waiting write to fail (EIO) instead of hanging: {a.target('db', 'b')}")
        wait_until(lambda: a.group("db")["writes_blocked_by"] == ["b"], 10, "writes blocked by b")
        assert "failed (EIO)" in a.target("db", "b")["last_error"]
        assert proc.poll() is None  # its flush waits for b, like a new write would
        drop.clear()
        proxy.reset()
        assert proc.wait(timeout=60) == 1  # its write failed; its flush then completed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = _writes(a.nbd_uri("data"), 2, 0x45, timeout=60)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
    topo.wait_converged()
    topo.assert_identical()


# ---- item 9: idle NBD connections, descriptors, log floods -------------------------------

class InteractiveQemuIo:
    """One qemu-io process holding one NBD connection, fed commands on stdin: a real
    client that stays connected while the test does other things."""

    def __init__(self, uri: str):
        self.proc = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.replace("qemu-io> ", ""))

    def write(self, pattern: int, offset: int, timeout: float = 10.0) -> str:
        """One 4 KiB write: its result line ("wrote ..." or the error)."""
        start = len(self.lines)
        self.proc.stdin.write(f"write -P {pattern} {offset} 4k\n")
        self.proc.stdin.flush()

        def answered():
            return next((line for line in self.lines[start:]
                         if line.startswith("wrote") or "error" in line.lower()
                         or "failed" in line.lower()), None)
        return wait_until(answered, timeout, f"qemu-io to answer a write at {offset}")

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections that never say a word (non-blocking connects: a server
    that stopped accepting must not hang the test)."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket) -> bool:
    if not select.select([s], [], [], 0)[0]:
        return False
    try:
        while s.recv(4096):  # the greeting, then EOF
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_nbd_connections_do_not_starve_a_connected_client(topology):
    """An agent limited to 256 descriptors gets idle anonymous connections (up to 320)
    until it refuses some. Before: the descriptors ran out, every write of the client
    already connected failed EIO ('Too many open files'), status timed out and the log
    grew by megabytes."""
    topo = topology(["a", "b"], [("a", "b", "sync")], start=False)
    a = topo["a"]
    a.nofile = 256
    topo.start()
    topo.wait_converged()
    client = InteractiveQemuIo(a.nbd_uri("data"))
    idle: list[socket.socket] = []
    try:
        assert client.write(0x21, 0).startswith("wrote 4096/4096"), client.lines
        log_before = os.path.getsize(a.log_path)
        # In waves below the listen backlog, so the kernel does not hold connects back.
        while len(idle) < 320 and "refused: descriptor" not in _log(a):
            wave = _idle_connections(a.nbd_port, 16)
            idle += wave
            try:  # greeted (accepted) or closed (refused); an agent out of descriptors
                wait_until(lambda: all(select.select([s], [], [], 0)[0] for s in wave), 5,
                           "the agent to take the connections")
            except AssertionError:
                pass  # it stopped accepting: what the writes below must survive
        for i in range(1, 21):
            result = client.write(0x21 + i, i * 4096)
            assert result.startswith("wrote 4096/4096"), f"write {i}: {result}"
            assert a.status()["node"] == "a"  # the admin socket answers (5 s timeout)
            time.sleep(0.05)
        status = a.status()
        assert status["nbd"]["per_export"] == {"data": 1}
        wait_until(lambda: "refused: descriptor" in (log := _log(a)) and "RLIMIT_NOFILE 256" in log,
                   20, "connections past the descriptor reserve refused")
        assert "Too many open files" not in _log(a)
        # Idle connections that never pick an export go after nbd_handshake_timeout (10 s)
        # (connects the full backlog held back come in later, and wait their 10 s too).
        wait_until(lambda: all(_closed_by_server(s) for s in idle), 45,
                   "every idle socket closed by the agent")
        assert a.status()["nbd"]["handshaking"] == 0
        # ... and repeated lines were collapsed: a few KiB, not megabytes.
        grown = os.path.getsize(a.log_path) - log_before
        assert grown < 64 * 1024, f"the log grew by {grown} bytes"
        assert "more messages like this are suppressed" in _log(a)
        # A new client gets in again.
        done = _writes(a.nbd_uri("data"), 3, 0x77, timeout=30)
        assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
        assert client.write(0x78, 0).startswith("wrote 4096/4096")
        # what was suppressed is summed up within a window (10 s) of the flood's end
        wait_until(lambda: "similar messages suppressed" in _log(a), 25,
                   "the count of suppressed lines in the log")
    finally:
        for s in idle:
            s.close()
        client.close()
    topo.wait_converged()
    topo.assert_identical()


def test_nbd_connections_per_export_are_limited(topology):
    topo = topology(["a"], [], start=False)
    a = topo["a"]
    a.config.update(nbd_max_connections_per_export=2, nbd_handshake_timeout=2)
    a.save_config()
    topo.start()
    clients = [InteractiveQemuIo(a.nbd_uri("data")) for _ in range(2)]
    try:
        for i, c in enumerate(clients):
            assert c.write(0x30 + i, i * 4096).startswith("wrote 4096/4096")
        third = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", a.nbd_uri("data")],
                               capture_output=True, text=True, timeout=30)
        assert "nbd_max_connections_per_export 2" in third.stdout + third.stderr, third
        other = _writes(a.nbd_uri("log"), 1, 0x40, timeout=30)  # another export has room
        assert other.returncode == 0 and "error" not in other.stdout.lower(), other.stdout
        # A connection that never negotiates is dropped after nbd_handshake_timeout.
        (silent,) = _idle_connections(a.nbd_port, 1)
        try:
            wait_until(lambda: _closed_by_server(silent), 15, "the silent client dropped")
        finally:
            silent.close()
    finally:
        for c in clients:
            c.close()
