"""Test-only helpers for the NBD server: file-backed Exports and an NbdServer running on
its own event loop in a background thread, bound to 127.0.0.1 on an ephemeral port.

`nbd_server` is a factory fixture; every server it made is closed, its loop stopped and
its files closed at teardown, even when the test failed. An error logged by asyncio
itself (an exception escaping a protocol callback) fails the test at teardown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import threading
from typing import Callable

import pytest

from replicator.capture import nbd as N
from replicator.capture.nbd import NbdServer

MiB = 1024 * 1024
REQUEST = struct.Struct(">IHHQQI")
_ZERO_CHUNK = bytes(MiB)


class FileExport:
    """An Export over a plain file; completes synchronously, right after the syscall."""

    def __init__(self, name: str, path: str, size: int, read_only: bool = False):
        self.name, self.path, self.size, self.read_only = name, path, size, read_only
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        self.fua_writes = 0

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset, data, fua, done) -> None:
        self._pwrite(offset, data, fua)
        done(0)

    def zero(self, offset, length, fua, done) -> None:
        self._zero(offset, length, fua)
        done(0)

    def flush(self, done) -> None:
        os.fdatasync(self.fd)
        done(0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _pwrite(self, offset, data, fua) -> None:
        os.pwrite(self.fd, data, offset)
        if fua:
            self.fua_writes += 1
            os.fdatasync(self.fd)

    def _zero(self, offset, length, fua) -> None:
        while length:
            n = min(length, len(_ZERO_CHUNK))
            os.pwrite(self.fd, _ZERO_CHUNK[:n], offset)
            offset += n
            length -= n
        if fua:
            os.fdatasync(self.fd)


class DeferredExport(FileExport):
    """Holds every write/zero/flush until the test releases it (on the loop thread, via
    ServerThread.call). The data reaches the file only at release, so a reply sent
    before its completion would show up as missing data. `outstanding` and
    `most_outstanding` count held requests."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: list[tuple[Callable[[], None], Callable[[int], None]]] = []
        self.calls = 0
        self.most_outstanding = 0

    @property
    def outstanding(self) -> int:
        return len(self.held)

    def write(self, offset, data, fua, done) -> None:
        self._hold(lambda: self._pwrite(offset, data, fua), done)

    def zero(self, offset, length, fua, done) -> None:
        self._hold(lambda: self._zero(offset, length, fua), done)

    def flush(self, done) -> None:
        self._hold(lambda: os.fdatasync(self.fd), done)

    def _hold(self, apply, done) -> None:
        self.calls += 1
        self.held.append((apply, done))
        self.most_outstanding = max(self.most_outstanding, len(self.held))

    def release(self, shuffle_seed: int | None = None) -> int:
        """Apply and complete everything held (newest first, or shuffled); returns how
        many. Requests the server takes meanwhile wait for the next release."""
        held, self.held = self.held, []
        if shuffle_seed is None:
            held.reverse()
        else:
            random.Random(shuffle_seed).shuffle(held)
        for apply, done in held:
            if self.fd >= 0:
                apply()
            done(0)
        return len(held)


class ErrorRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ServerThread:
    """An NbdServer on a private loop in a daemon thread. `exports` is a dict the test
    may change (the server reads it at each handshake). With `tls` (a server context)
    it listens TLS-only, granting `grants` (client name -> config.NbdGrant)."""

    def __init__(self, exports: dict, tls=None, grants=None, **kwargs):
        self.exports = exports
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-test-loop",
                                       daemon=True)
        self.thread.start()
        try:
            self.server = self.call(lambda: NbdServer(lambda: self.exports, **kwargs))
            self.server.tls_context, self.server.grants = tls, grants or {}
            asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0, tls=tls is not None),
                                             self.loop).result(10)
        except BaseException:
            self._stop_loop()
            raise
        self.port = self.server.port

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def call(self, fn: Callable, *args, timeout: float = 10):
        """Run fn(*args) on the server's loop thread and return its result."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(15)
        finally:
            self._stop_loop()
            for export in self.exports.values():
                export.close()

    def _stop_loop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def default_exports(tmp_path) -> dict:
    """"data": 8 MiB writable, zero-filled; "ro": 1 MiB read-only, filled with 0x5a."""
    ro_path = tmp_path / "ro.img"
    ro_path.write_bytes(b"\x5a" * MiB)
    return {
        "data": FileExport("data", str(tmp_path / "data.img"), 8 * MiB),
        "ro": FileExport("ro", str(ro_path), MiB, read_only=True),
    }


@pytest.fixture
def nbd_server(tmp_path):
    """Factory: nbd_server(exports=None, **NbdServer kwargs) -> a started ServerThread."""
    servers: list[ServerThread] = []
    asyncio_errors = ErrorRecorder()
    logging.getLogger("asyncio").addHandler(asyncio_errors)

    def make(exports: dict | None = None, **kwargs) -> ServerThread:
        if exports is None:
            exports = default_exports(tmp_path)
        try:
            srv = ServerThread(exports, **kwargs)
        except BaseException:
            for export in exports.values():
                export.close()
            raise
        servers.append(srv)
        return srv

    try:
        yield make
    finally:
        logging.getLogger("asyncio").removeHandler(asyncio_errors)
        for srv in servers:
            srv.close()
    assert not asyncio_errors.records, "asyncio logged errors:\n" + "\n".join(
        asyncio_errors.format(r) for r in asyncio_errors.records)


class Client:
    """A deliberately dumb NBD client: sends exactly what the test says."""

    def __init__(self, port: int, greet: bool = True):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if greet:
            magic, ihaveopt, flags = struct.unpack(">QQH", self.recv(18))
            assert (magic, ihaveopt, flags) == (N.NBDMAGIC, N.IHAVEOPT, 3)

    def close(self):
        self.s.close()

    def recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def wait_closed(self) -> None:
        """Read (and drop) whatever comes until the server closes; fail on a timeout."""
        try:
            while self.s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass

    def start(self, flags=N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES):
        self.s.sendall(struct.pack(">I", flags))

    def starttls(self, context) -> None:
        """STARTTLS, acknowledged, then the TLS handshake with `context` (a client's)."""
        self.option(N.Opt.STARTTLS)
        assert self.option_reply()[1] == N.Rep.ACK
        self.s = context.wrap_socket(self.s, server_hostname="127.0.0.1")

    def option(self, opt: int, data: bytes = b"") -> None:
        self.s.sendall(struct.pack(">QII", N.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self):
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == N.OPTION_REPLY_MAGIC
        return opt, rep, self.recv(length)

    @staticmethod
    def go_payload(name: str | bytes, infos=()) -> bytes:
        raw = name.encode() if isinstance(name, str) else name
        return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))

    def go(self, name, infos=(), opt=N.Opt.GO):
        """Send GO (or INFO); return [(rep, data)] up to and including the final reply."""
        self.option(opt, self.go_payload(name, infos))
        replies = []
        while True:
            got_opt, rep, data = self.option_reply()
            assert got_opt == opt
            replies.append((rep, data))
            if rep != N.Rep.INFO:
                return replies

    def request(self, cmd, offset=0, length=0, handle=1, flags=0, data=b"") -> None:
        self.s.sendall(self.pack(cmd, offset, length, handle, flags) + data)

    @staticmethod
    def pack(cmd, offset=0, length=0, handle=1, flags=0) -> bytes:
        return REQUEST.pack(N.REQUEST_MAGIC, flags, cmd, handle, offset, length)

    def reply(self, read_length: int = 0):
        """(error, handle, data); data is read only for a successful READ reply."""
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == N.SIMPLE_REPLY_MAGIC
        return err, handle, (self.recv(read_length) if read_length and not err else b"")
