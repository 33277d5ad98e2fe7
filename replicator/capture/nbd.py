"""NBD server: how writes enter the product.

Theory of operation. One asyncio Protocol per client connection, in two phases:
- handshake (fixed newstyle): the server greets, the client answers its flags, then
  sends options. Supported: GO and INFO (NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE,
  NBD_INFO_NAME), EXPORT_NAME, LIST, ABORT. STRUCTURED_REPLY, meta contexts and
  everything else get NBD_REP_ERR_UNSUP; STARTTLS gets ERR_POLICY. An unknown or
  empty export name is refused (ERR_UNKNOWN naming the valid ones; EXPORT_NAME
  closes, as the spec requires): we never guess which volume a client meant.
- transmission: requests are parsed from one bytearray, as many per data_received as
  are buffered, and handed to the Export (READ synchronously; WRITE, TRIM and
  WRITE_ZEROES, FLUSH with a `done(errno)` callback that may fire later). Replies are
  simple replies, possibly out of order, collected and written once per loop turn.
  Too many requests in flight pauses reading.

Errors: bad request magic closes the connection (the stream cannot be resynchronised);
an unknown command gets EINVAL; a range past the end gets EINVAL (READ) or ENOSPC
(WRITE/TRIM/WRITE_ZEROES, payload consumed first); writes to a read-only export get
EPERM; READ longer than max_request gets EINVAL; WRITE longer than max_request gets
EINVAL and the connection is closed (the payload cannot be skipped safely). DISC
waits for outstanding requests, sends their replies and closes. Exceptions from the
export become EIO and are logged; the server never dies of one client.
"""

from __future__ import annotations

import asyncio
import errno as E
import logging
import struct
from typing import Callable, Mapping, Protocol

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = 0x80000006, 0x80000009
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN = 32, 64, 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA = 1

NBD_ERRNO = {E.EPERM: 1, E.EIO: 5, E.ENOMEM: 12, E.EINVAL: 22, E.ENOSPC: 28,
             E.EOVERFLOW: 75, E.ENOTSUP: 95, E.ESHUTDOWN: 108, E.EROFS: 1, E.EDQUOT: 28,
             E.EFBIG: 28}

MAX_OPTION = 64 * 1024
MAX_IN_FLIGHT = 128
MAX_PENDING_BYTES = 64 << 20

_OPT_HDR = struct.Struct(">QII")
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT_REPLY = struct.Struct(">QIII")

Done = Callable[[int], None]


class Export(Protocol):
    name: str
    size: int
    read_only: bool

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes, fua: bool, done: Done) -> None: ...
    def zero(self, offset: int, length: int, fua: bool, done: Done) -> None: ...
    def flush(self, done: Done) -> None: ...


class _Conn(asyncio.Protocol):
    def __init__(self, server: "NbdServer"):
        self.server = server
        self.log = server.log
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.phase = "flags"  # flags -> options -> transmission -> closing
        self.no_zeroes = False
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.in_flight = 0
        self.pending_bytes = 0
        self.paused = False
        self.disc = False
        self.timer: asyncio.TimerHandle | None = None

    # ---- asyncio plumbing ------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.conns.add(self)
        self.peer = transport.get_extra_info("peername")
        transport.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                    FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        self.timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._abort, "handshake timed out")

    def connection_lost(self, exc) -> None:
        self.server.conns.discard(self)
        if self.timer:
            self.timer.cancel()
        self.phase = "closed"

    def _abort(self, why: str) -> None:
        if self.phase != "closed":
            self.log.info("NBD client %s: %s; closing", self.peer, why)
            self.phase = "closing"
            self._flush()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            if self.phase == "transmission":
                self._requests()
            else:
                self._handshake()
                self._flush()
                if self.phase == "transmission" and self.buf:
                    self._requests()
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            self.log.exception("NBD client %s: internal error", self.peer)
            self.transport.abort()

    # ---- handshake ---------------------------------------------------------------------
    def _handshake(self) -> None:
        buf = self.buf
        while self.phase in ("flags", "options"):
            if self.phase == "flags":
                if len(buf) < 4:
                    return
                flags = int.from_bytes(buf[:4], "big")
                del buf[:4]
                if not flags & FLAG_FIXED_NEWSTYLE or flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
                    return self._abort(f"unsupported client flags 0x{flags:x}")
                self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
                self.phase = "options"
                continue
            if len(buf) < _OPT_HDR.size:
                return
            magic, opt, length = _OPT_HDR.unpack_from(buf)
            if magic != IHAVEOPT:
                return self._abort("bad option magic")
            if length > MAX_OPTION:
                if length > 16 * MAX_OPTION:
                    return self._abort(f"option {opt} of {length} bytes")
                if len(buf) < _OPT_HDR.size + length:
                    return
                del buf[:_OPT_HDR.size + length]
                self._opt_reply(opt, REP_ERR_TOO_BIG, b"option too large")
                continue
            if len(buf) < _OPT_HDR.size + length:
                return
            data = bytes(buf[_OPT_HDR.size:_OPT_HDR.size + length])
            del buf[:_OPT_HDR.size + length]
            self._option(opt, data)

    def _opt_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.out.append(_OPT_REPLY.pack(REPLY_MAGIC, opt, rep, len(data)) + data)

    def _option(self, opt: int, data: bytes) -> None:
        exports = self.server.exports()
        if opt == OPT_EXPORT_NAME:
            export = exports.get(data.decode(errors="replace")) if data else None
            if export is None:
                return self._abort(f"unknown export {data[:64]!r}")
            self.out.append(struct.pack(">QH", export.size, self._tflags(export)))
            if not self.no_zeroes:
                self.out.append(bytes(124))
            return self._enter(export)
        if opt in (OPT_GO, OPT_INFO):
            if len(data) < 6:
                return self._opt_reply(opt, REP_ERR_INVALID, b"malformed GO/INFO")
            nlen = int.from_bytes(data[:4], "big")
            if 4 + nlen + 2 > len(data):
                return self._opt_reply(opt, REP_ERR_INVALID, b"malformed GO/INFO")
            name = data[4:4 + nlen]
            nreq = int.from_bytes(data[4 + nlen:6 + nlen], "big")
            if len(data) != 6 + nlen + 2 * nreq:
                return self._opt_reply(opt, REP_ERR_INVALID, b"malformed GO/INFO")
            reqs = struct.unpack(f">{nreq}H", data[6 + nlen:])
            export = exports.get(name.decode(errors="replace")) if name else None
            if export is None:
                msg = (f"unknown export {name.decode(errors='replace')!r}; exports: "
                       f"{', '.join(sorted(exports)) or 'none'}").encode()[:4096]
                return self._opt_reply(opt, REP_ERR_UNKNOWN, msg)
            self._opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size,
                                                       self._tflags(export)))
            self._opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096,
                                                       self.server.max_request))
            if INFO_NAME in reqs:
                self._opt_reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode())
            self._opt_reply(opt, REP_ACK)
            if opt == OPT_GO:
                self._enter(export)
            return
        if opt == OPT_LIST:
            if data:
                return self._opt_reply(opt, REP_ERR_INVALID, b"LIST takes no data")
            for name in sorted(exports):
                raw = name.encode()
                self._opt_reply(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
            return self._opt_reply(opt, REP_ACK)
        if opt == OPT_ABORT:
            self._opt_reply(opt, REP_ACK)
            self.phase = "closing"
            self._flush()
            self.transport.close()
            return
        if opt == OPT_STARTTLS:
            return self._opt_reply(opt, REP_ERR_POLICY, b"TLS is not offered on this port")
        self._opt_reply(opt, REP_ERR_UNSUP)

    @staticmethod
    def _tflags(export: Export) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN
        if export.read_only:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return flags

    def _enter(self, export: Export) -> None:
        self.export = export
        self.phase = "transmission"
        if self.timer:
            self.timer.cancel()
            self.timer = None

    # ---- transmission ------------------------------------------------------------------
    def _requests(self) -> None:
        buf = self.buf
        pos = 0
        end = len(buf)
        export = self.export
        max_req = self.server.max_request
        while end - pos >= 28 and self.phase == "transmission":
            magic, flags, cmd, handle, offset, length = _REQ.unpack_from(buf, pos)
            if magic != REQUEST_MAGIC:
                del buf[:pos]
                return self._abort(f"bad request magic 0x{magic:08x}")
            if cmd == CMD_WRITE:
                if length > max_req:
                    del buf[:pos]
                    self._reply(handle, E.EINVAL)
                    return self._abort(f"write of {length} bytes exceeds {max_req}")
                if end - pos < 28 + length:
                    break
                start = pos + 28
                pos = start + length
                if export.read_only:
                    self._reply(handle, E.EPERM)
                elif offset + length > export.size:
                    self._reply(handle, E.ENOSPC)
                else:
                    self._start(handle, length)
                    data = bytes(memoryview(buf)[start:pos])
                    self._call(export.write, handle, offset, data, bool(flags & CMD_FLAG_FUA))
                continue
            pos += 28
            if cmd == CMD_READ:
                if length > max_req or offset + length > export.size:
                    self._reply(handle, E.EINVAL)
                    continue
                try:
                    data = export.read(offset, length)
                except Exception as exc:  # noqa: BLE001
                    self.log.error("NBD read %s [%d,+%d): %s", export.name, offset, length, exc)
                    self._reply(handle, E.EIO)
                    continue
                self._reply(handle, 0, data)
            elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
                if export.read_only:
                    self._reply(handle, E.EPERM)
                elif offset + length > export.size:
                    self._reply(handle, E.ENOSPC)
                else:
                    self._start(handle, 0)
                    self._call(export.zero, handle, offset, length, bool(flags & CMD_FLAG_FUA))
            elif cmd == CMD_FLUSH:
                self._start(handle, 0)
                self._call(export.flush, handle)
            elif cmd == CMD_DISC:
                self.disc = True
                self.phase = "closing"
                break
            else:
                self._reply(handle, E.EINVAL)
        if pos:
            del buf[:pos]
        if self.disc:
            self._maybe_close()
        elif not self.paused and (self.in_flight > MAX_IN_FLIGHT
                                  or self.pending_bytes > MAX_PENDING_BYTES):
            self.paused = True
            self.transport.pause_reading()

    def _start(self, handle: int, nbytes: int) -> None:
        self.in_flight += 1
        self.pending_bytes += nbytes

    def _call(self, fn, handle: int, *args) -> None:
        nbytes = len(args[1]) if fn == self.export.write else 0

        def done(err: int, handle=handle, nbytes=nbytes) -> None:
            self.in_flight -= 1
            self.pending_bytes -= nbytes
            self._reply(handle, err)
            if self.paused and self.in_flight <= MAX_IN_FLIGHT // 2 \
                    and self.pending_bytes <= MAX_PENDING_BYTES // 2 and self.phase == "transmission":
                self.paused = False
                self.transport.resume_reading()
            if self.disc:
                self._maybe_close()

        try:
            fn(*args, done)
        except Exception as exc:  # noqa: BLE001
            self.log.error("NBD %s on %s failed: %s", getattr(fn, "__name__", fn),
                           self.export.name, exc)
            done(E.EIO)

    def _reply(self, handle: int, err: int, data: bytes = b"") -> None:
        if self.phase == "closed":
            return
        code = NBD_ERRNO.get(err, 5) if err else 0
        self.out.append(_REPLY.pack(SIMPLE_REPLY_MAGIC, code, handle))
        if data and not err:
            self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.phase != "closed":
            self.transport.writelines(self.out)
        self.out = []

    def _maybe_close(self) -> None:
        if self.in_flight == 0 and self.phase != "closed":
            self._flush()
            self.transport.close()


class NbdServer:
    def __init__(self, exports: Callable[[], Mapping[str, Export]], *,
                 max_request: int = 32 << 20, handshake_timeout: float = 30.0,
                 log: logging.Logger | None = None):
        self.exports = exports
        self.max_request = max_request
        self.handshake_timeout = handshake_timeout
        self.log = log or logging.getLogger("replicator.nbd")
        self.conns: set[_Conn] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), host, port,
                                                reuse_address=True)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.conns):
            conn.phase = "closing"
            conn.transport.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), 5)
        except asyncio.TimeoutError:
            pass
