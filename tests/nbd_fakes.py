"""An NBD server connection (capture/nbd.py's _Connection) driven by hand, with no socket
and no event loop: a fake loop (timers never fire, call_soon is run by the caller), a
fake transport that collects what is written, and in-memory exports that complete at
once or when released. For the property tests and fuzz/fuzz_parsers.py: bytes go in
through get_buffer/buffer_updated exactly as asyncio hands them over."""

from __future__ import annotations

import logging
import struct

from replicator.capture import nbd as N

CLIENT_FLAGS = struct.pack(">I", N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES)


class _Handle:
    def cancel(self):
        pass

    def when(self):
        return 0.0


class FakeLoop:
    def __init__(self):
        self.soon = []

    def call_later(self, delay, fn, *args):
        return _Handle()

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))
        return _Handle()

    def time(self):
        return 0.0

    def create_task(self, coro):
        coro.close()  # the TLS handshake after STARTTLS: not run here
        return _Handle()

    def run_soon(self):
        while self.soon:
            soon, self.soon = self.soon, []
            for fn, args in soon:
                fn(*args)


class FakeTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def write(self, data):
        assert not self.closed, "the server wrote after closing"
        self.out += data

    def close(self):
        self.closed = True

    abort = write_eof = close

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def can_write_eof(self):
        return True

    def get_extra_info(self, name, default=None):
        return {"peername": ("fake", 1)}.get(name, default)


class MemoryExport:
    """An export in memory; checks that the server only ever asks for what is in range."""

    def __init__(self, name: str, size: int, read_only: bool = False, deferred: bool = False):
        self.name, self.size, self.read_only, self.deferred = name, size, read_only, deferred
        self.data = bytearray(size)
        self.held = []

    def read(self, offset, length):
        assert 0 <= offset and offset + length <= self.size, (offset, length)
        return bytes(self.data[offset:offset + length])

    def write(self, offset, data, fua, done):
        assert 0 <= offset and offset + len(data) <= self.size and not self.read_only
        self.data[offset:offset + len(data)] = data
        self._done(done)

    def zero(self, offset, length, fua, done):
        assert 0 <= offset and offset + length <= self.size and not self.read_only
        self.data[offset:offset + length] = bytes(length)
        self._done(done)

    def flush(self, done):
        self._done(done)

    def _done(self, done):
        if self.deferred:
            self.held.append(done)
        else:
            done(0)

    def release(self):
        held, self.held = self.held, []
        for done in held:
            done(0)


class ErrorLog(logging.Handler):
    """Collects what the server logs at ERROR (an internal error is one)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def make_logger(name: str = "replicator.test.nbd-fake") -> tuple[logging.Logger, ErrorLog]:
    log = logging.getLogger(name)
    log.propagate = False
    log.setLevel(logging.WARNING)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    errors = ErrorLog()
    log.addHandler(errors)
    return log, errors


def drive(stream: bytes, *, chunk: int = 4096, tls: bool = False, deferred: bool = False,
          turns: bool = True, max_request: int = 128 << 10, per_export: int = 2,
          log: logging.Logger | None = None, exports: dict | None = None):
    """Feed `stream` to one connection in pieces of `chunk` bytes (then EOF) and return
    (transport, connection, server). With `turns`, the loop turns between pieces (held
    completions released, scheduled flushes run)."""
    if exports is None:
        exports = {"data": MemoryExport("data", 1 << 20, deferred=deferred),
                   "ro": MemoryExport("ro", 64 << 10, read_only=True, deferred=deferred)}
    server = N.NbdServer(lambda: exports, max_request=max_request, log=log,
                         max_connections_per_export=per_export)
    server.loop = FakeLoop()
    server.tls_context = object() if tls else None
    conn = N._Connection(server, tls)
    transport = FakeTransport()
    conn.connection_made(transport)
    pos = 0
    while pos < len(stream) and not transport.closed:
        buf = conn.get_buffer(-1)
        n = min(chunk, len(buf), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        pos += n
        conn.buffer_updated(n)
        # a WRITE's payload is received in place only up to max_request
        assert conn._payload_view is None or len(conn._payload_view) <= max_request
        if turns:
            for export in exports.values():
                export.release()
            server.loop.run_soon()
    if not transport.closed:
        conn.eof_received()
    for export in exports.values():
        export.release()
    server.loop.run_soon()
    conn.connection_lost(None)
    return transport, conn, server
