"""A file-backed NBD export and an NbdServer running on a loop in a background thread
(test-only; the agent's exports go through the group write path)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from replicator.capture.nbd import NbdServer


class FileExport:
    def __init__(self, name: str, path: str, size: int, read_only: bool = False, defer: bool = False):
        self.name, self.size, self.read_only = name, size, read_only
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(self.fd, size)
        self.defer = defer  # complete writes later, in reverse order
        self.deferred = []

    def read(self, offset, length):
        return os.pread(self.fd, length, offset)

    def write(self, offset, data, fua, done):
        os.pwrite(self.fd, data, offset)
        self._complete(done)

    def zero(self, offset, length, fua, done):
        os.pwrite(self.fd, bytes(length), offset)
        self._complete(done)

    def flush(self, done):
        done(0)

    def _complete(self, done):
        if not self.defer:
            return done(0)
        self.deferred.append(done)
        if len(self.deferred) == 1:
            asyncio.get_running_loop().call_later(0.05, self._release)

    def _release(self):
        pending, self.deferred = self.deferred, []
        for done in reversed(pending):
            done(0)


class ServerThread:
    def __init__(self, exports: dict, **kwargs):
        self.exports = exports
        self.loop = asyncio.new_event_loop()
        self.server = NbdServer(lambda: self.exports, **kwargs)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.port

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        for e in self.exports.values():
            os.close(e.fd)


@pytest.fixture
def nbd_server(tmp_path):
    servers = []

    def make(exports=None, **kwargs):
        exports = exports or {
            "data": FileExport("data", str(tmp_path / "data.img"), 8 << 20),
            "ro": FileExport("ro", str(tmp_path / "ro.img"), 1 << 20, read_only=True),
        }
        srv = ServerThread(exports, **kwargs)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()
