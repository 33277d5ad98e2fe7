"""NBD server: how block writes enter the product.

Theory of operation
-------------------
`NbdServer` listens on TCP (plain, or TLS only) and on unix sockets; every client
connection is one `_Connection`, an `asyncio.Protocol` that walks these states (anything
else closes the connection):

    FLAGS        --client flags with FIXED_NEWSTYLE--------------> OPTIONS
    OPTIONS      --STARTTLS on a TLS listener, ACK sent----------> TLS
    TLS          --handshake with a certificate of the CA--------> OPTIONS (as the client)
    OPTIONS      --GO / EXPORT_NAME naming a known export-------> TRANSMISSION
    OPTIONS      --ABORT, bad magic, unknown EXPORT_NAME--------> CLOSED
    TRANSMISSION --DISC, client EOF, server close()------------> DRAINING
    DRAINING     --last outstanding request answered------------> CLOSED
    TRANSMISSION --WRITE longer than max_request----------------> LINGERING
    LINGERING    --client EOF or LINGER_SECONDS-----------------> CLOSED
    any          --bad request magic, handshake timeout, loss---> CLOSED

The handshake is the fixed newstyle one: the server greets with NBDMAGIC, IHAVEOPT and
FIXED_NEWSTYLE|NO_ZEROES; the client must answer FIXED_NEWSTYLE (NO_ZEROES optional,
anything else closes) and then sends options. It must reach TRANSMISSION within
`handshake_timeout` seconds. `exports()` is called for every option that names or lists
exports, so the set may change at runtime.

Connection limits (so that idle or hostile clients cannot take what the write path of
the clients already connected needs: 1,011 idle connections once exhausted the
agent's descriptors and every journal write failed EMFILE):
    max_connections              connections at once, handshaking ones included; a
                                 connection beyond it is closed as soon as accepted.
    max_connections_per_export   connections in transmission on one export; GO for a
                                 full export is answered ERR_POLICY, EXPORT_NAME closes.
    fd_reserve                   a connection accepted on a descriptor number within
                                 fd_reserve of RLIMIT_NOFILE is closed at once: Linux
                                 hands out the lowest free number, so every lower one is
                                 in use and only the reserve is left for journal
                                 segments, checkpoints, replication and admin sockets.
                                 The listen backlog (LISTEN_BACKLOG) stays below it, as
                                 asyncio accepts up to that many sockets in one go.
Refusals are logged at WARNING (repeats are collapsed by the agent's log filter).

TLS (`start(..., tls=True)`, nbd_tls_listen) has the NBD spec's FORCEDTLS semantics:
before STARTTLS every option but ABORT is answered ERR_TLS_REQD (EXPORT_NAME, which has
no error reply, closes), so nothing, not even the list of exports, is told to a client
that has not authenticated. STARTTLS is acknowledged, then `tls_context` (read at that
moment, so a reload's new certificate or CRL serves the next client) runs the handshake,
which requires a client certificate of the CA (credentials.py) within what is left of
the handshake timeout. The client is the certificate's CN; only an NBD client
certificate (pki.CLIENT_OU) is one. `grants` (nbd_clients: name -> NbdGrant, read at
each option) says which exports it may list and open, and whether read-write; the
others are unknown to it. A plain listener (loopback, unix socket) answers STARTTLS
ERR_POLICY and serves every export: who may connect is the socket's business.

Options
    EXPORT_NAME   enters transmission; unknown or empty name closes (the spec leaves no
                  way to answer an error).
    INFO, GO      NBD_REP_INFO with NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (minimum 1,
                  preferred 4096, maximum `max_request`), NBD_INFO_NAME when asked; then
                  ACK (GO enters transmission). Unknown or empty name: ERR_UNKNOWN with a
                  message listing the valid names; we never guess a default export.
    LIST          one REP_SERVER per export, then ACK.
    ABORT         ACK, then close.
    STARTTLS      TLS listener: ACK and the handshake (ERR_INVALID once TLS is on or
                  with data); plain listener: ERR_POLICY.
    anything else ERR_UNSUP (STRUCTURED_REPLY, meta contexts, extended headers...).
    An option payload over MAX_OPTION bytes is discarded as it arrives and answered
    ERR_TOO_BIG; over MAX_DISCARD bytes (or an oversized EXPORT_NAME) closes.

Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES,
CAN_MULTI_CONN, and READ_ONLY for read-only exports. Simple replies only.

Commands
    READ          `Export.read`, synchronous, answered in the same loop turn.
    WRITE         `Export.write(offset, data, fua, done)`; data is the export's to keep
                  (bytes, or a bytearray the server never touches again).
    TRIM, WRITE_ZEROES
                  `Export.zero(offset, length, fua, done)`; NO_HOLE accepted and ignored
                  (zeroes are always written as data or journal records).
    FLUSH         `Export.flush(done)`.
    DISC          stop reading, answer everything outstanding, close.
    Zero-length WRITE/TRIM/WRITE_ZEROES succeed without calling the export.

`done(errno)` may be called synchronously inside the export call or later, but always
on the event-loop thread, and exactly once per call. Replies may therefore go out of
order; the client matches them by handle. Replies are gathered per connection and
written with one `transport.write` per loop turn (at the end of `data_received` for
synchronous completions, from a `call_soon` otherwise).

Back-pressure: the parser stops taking requests (and pauses reading) while
MAX_IN_FLIGHT requests or MAX_PENDING_BYTES of write payload are outstanding, or while
the transport's write buffer is above its high-water mark; it resumes below half.

Errors (NBD error values are the Linux errno numbers)
    bad request magic            log, close: the stream cannot be resynchronised.
    unknown command or flag      EINVAL, keep serving.
    READ past the end            EINVAL.
    WRITE/TRIM/ZEROES past end   ENOSPC (the WRITE payload is consumed first).
    WRITE/TRIM/ZEROES read-only  EPERM (payload consumed first).
    READ over max_request        EINVAL, keep serving.
    WRITE over max_request       EINVAL, then close: the payload cannot be skipped
                                 safely. The server half-closes and keeps discarding
                                 input for LINGER_SECONDS so the client sees the reply
                                 rather than a reset.
    done(err) from the export    EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP,
                                 ESHUTDOWN pass through; EROFS -> EPERM; EDQUOT, EFBIG
                                 -> ENOSPC (as the spec asks); anything else -> EIO.
    the export raises            EIO, logged (rate-limited per connection).
    short read from the export   EIO, logged.
A misbehaving client only ever loses its own connection.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import grp
import logging
import os
import resource
import ssl
import struct
from typing import Callable, Mapping, Protocol

__all__ = ["Export", "NbdServer", "Done"]

from ..config import NbdGrant
from ..pki import CLIENT_OU
from ..transport import tls_failure
from ..nbd_protocol import (
    BLOCK_INFO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, EXPORT_INFO, EXPORT_NAME_REPLY,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, GREETING, IHAVEOPT, NBDMAGIC, OPTION,
    OPTION_REPLY, OPTION_REPLY_MAGIC, REPLY, REQUEST, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, U16,
    U32, Cmd, Info, Opt, Rep, TransmissionFlag,
)

# Plain ints for the request loop (cheaper than enum members there).
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _WRITE_ZEROES = (int(c) for c in (
    Cmd.READ, Cmd.WRITE, Cmd.DISC, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES))
_FUA = CMD_FLAG_FUA
_NOT_FUA = ~CMD_FLAG_FUA & 0xFFFF
_NOT_ZERO_FLAGS = ~(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) & 0xFFFF

# Python errno -> NBD error value. Anything not listed becomes EIO.
NBD_EIO = 5
NBD_ERRORS: dict[int, int] = {
    errno.EPERM: 1, errno.EIO: 5, errno.ENOMEM: 12, errno.EINVAL: 22, errno.ENOSPC: 28,
    errno.EOVERFLOW: 75, errno.ENOTSUP: 95, errno.ESHUTDOWN: 108,
    errno.EROFS: 1, errno.EDQUOT: 28, errno.EFBIG: 28,
}

# ---- limits ------------------------------------------------------------------------------

MAX_OPTION = 64 * 1024          # option payloads above this get ERR_TOO_BIG
MAX_DISCARD = 16 * 1024 * 1024  # ...and above this the client is not worth listening to
MAX_NAME_LIST = 4096            # bytes of export names quoted in an ERR_UNKNOWN message
MAX_IN_FLIGHT = 128             # outstanding requests per connection before pausing
MAX_PENDING_BYTES = 64 << 20    # outstanding write payload per connection before pausing
SCRATCH_BYTES = 256 << 10       # receive buffer per connection
DIRECT_PAYLOAD = 64 << 10       # WRITE payloads from this size are received in place
LINGER_SECONDS = 2.0            # input discarded after refusing an oversized WRITE
CLOSE_TIMEOUT = 5.0             # NbdServer.close(): wait for outstanding requests
FD_RESERVE = 64                 # descriptors never handed to NBD clients (see above)
LISTEN_BACKLOG = 32             # < FD_RESERVE: asyncio accepts up to this many at once
EXPORT_ERRORS_LOGGED = 10       # per connection; the rest are counted

PREFERRED_BLOCK = 4096

_REQUEST_SIZE = REQUEST.size          # 28

Done = Callable[[int], None]


class Export(Protocol):
    """One volume as NBD sees it. All methods are called on the event-loop thread.

    `done(err)` must be called exactly once, on the event-loop thread, with 0 or a Python
    errno, either inside the call or later. An exception from any method is answered
    EIO (and logged); if `done` was already called, the exception is only logged.
    """

    name: str
    size: int
    read_only: bool

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes | bytearray, fua: bool, done: Done) -> None: ...
    def zero(self, offset: int, length: int, fua: bool, done: Done) -> None: ...
    def flush(self, done: Done) -> None: ...


class _State(enum.Enum):
    FLAGS = "awaiting client flags"
    OPTIONS = "negotiating options"
    TLS = "TLS handshake"
    TRANSMISSION = "transmission"
    DRAINING = "draining outstanding requests"
    LINGERING = "lingering after a refused write"
    CLOSED = "closed"


_FLAGS, _OPTIONS, _TLS, _TRANSMISSION = _State.FLAGS, _State.OPTIONS, _State.TLS, _State.TRANSMISSION
_EVERYTHING = NbdGrant(exports=("*",), write=True)  # a plain listener's client
_DRAINING, _LINGERING, _CLOSED = _State.DRAINING, _State.LINGERING, _State.CLOSED


def transmission_flags(export: Export, read_only: bool = False) -> int:
    flags = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
             | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
             | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.CAN_MULTI_CONN)
    if export.read_only or read_only:
        flags |= TransmissionFlag.READ_ONLY
    return int(flags)


class _Connection(asyncio.BufferedProtocol):
    """One client. Cleanup happens in connection_lost only; everything else that wants
    the connection gone closes (or aborts) the transport.

    Input is received into a reusable scratch buffer and parsed from `_buf`, except the
    payload of a large WRITE (DIRECT_PAYLOAD or more): once its header is parsed, the
    socket is read straight into a buffer of the payload's size, which then goes to
    the export as it is (one copy of the data instead of three)."""

    def __init__(self, server: NbdServer, tls: bool):
        self._server = server
        self._tls = tls                # a TLS-only listener's: STARTTLS before all else
        self._client: str | None = None  # after TLS: the client its certificate names
        self._not_client = ""          # after TLS: why its certificate is no client's
        self._read_only = False        # its grant is read-only
        self._tls_task: asyncio.Task | None = None  # the handshake after STARTTLS
        self._log = server.log
        self._loop = server.loop
        self._max_request = server.max_request
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._state = _FLAGS
        self._buf = bytearray()
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._payload_view: memoryview | None = None  # a large WRITE's payload, arriving
        self._payload_got = 0
        self._payload_write: tuple = ()  # (handle, offset, fua) of that WRITE
        self._skip = 0                 # bytes of an oversized option still to discard
        self._skip_option = 0
        self._no_zeroes = False
        self._export: Export | None = None
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        # replies
        self._out: list[bytes] = []
        self._receiving = False        # inside data_received: it flushes on the way out
        self._flush_pending = False    # a flush is scheduled or will happen on the way out
        # back-pressure
        self._in_flight = 0
        self._pending_bytes = 0
        self._paused = False           # we stopped parsing and paused the transport
        self._write_blocked = False    # the transport asked us to stop producing
        self._export_errors = 0

    # ---- asyncio plumbing -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple)
                      else f"on {transport.get_extra_info('sockname')}")
        server = self._server
        refusal = "shutting down" if server._closing else server._refusal(transport)
        if refusal:
            self._state = _CLOSED
            transport.abort()
            if not server._closing:
                self._log.warning("NBD client %s refused: %s", self._peer, refusal)
            return
        server._connections.add(self)
        transport.write(GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        self._timer = self._loop.call_later(self._server.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self._cancel_timer()
        self._out = []
        self._buf = bytearray()
        self._drop_payload()
        if self._export_errors > EXPORT_ERRORS_LOGGED:
            self._log.error("NBD client %s: %d export errors in all (%d not logged)", self._peer,
                            self._export_errors, self._export_errors - EXPORT_ERRORS_LOGGED)
        self._server._forget(self)

    def eof_received(self) -> bool | None:
        # A client that half-closes after its requests still gets their replies.
        if self._state is _TRANSMISSION or self._state is _DRAINING:
            self._drain()
            return True
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        self._write_blocked = True
        state = self._state
        if not self._paused and (state is _TRANSMISSION or state is _OPTIONS or state is _FLAGS):
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._maybe_resume()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload_view is not None:
            return self._payload_view[self._payload_got:]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state is _TLS:  # decrypted before _start_tls resumed: kept for it
            self._buf += self._scratch[:nbytes]
            return
        if state is not _TRANSMISSION and state is not _FLAGS and state is not _OPTIONS:
            return  # draining after DISC, lingering or closed: input is ignored
        payload = self._payload_view
        if payload is not None:
            self._payload_got += nbytes
            if self._payload_got < len(payload):
                return
        else:
            self._buf += self._scratch[:nbytes]
        self._receiving = True
        try:
            if payload is not None:  # complete: it goes to the export as it is
                handle, offset, fua = self._payload_write
                data = payload.obj
                self._drop_payload()
                self._write(handle, offset, data, fua)
            if state is not _TRANSMISSION:
                self._negotiate()
            if self._state is _TRANSMISSION and not self._paused:
                self._parse_requests()
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the server
            self._log.exception("NBD client %s: internal error in state %s; closing",
                                self._peer, self._state.value)
            self._state = _CLOSED
            self._transport.abort()
        finally:
            self._receiving = False
            if self._out:
                self._flush()

    # ---- closing --------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hang_up(self, why: str, level: int = logging.INFO) -> None:
        """Close now (after writing what is queued); no further input is looked at."""
        if self._state is _CLOSED:
            return
        if why:
            self._log.log(level, "NBD client %s: %s; closing", self._peer, why)
        self._flush()
        self._state = _CLOSED
        self._transport.close()

    def _handshake_expired(self) -> None:
        self._timer = None
        if self._state is _FLAGS or self._state is _OPTIONS or self._state is _TLS:
            self._log.info("NBD client %s: no export chosen within %gs; closing", self._peer,
                           self._server.handshake_timeout)
            self._state = _CLOSED
            self._transport.abort()

    def _drain(self) -> None:
        """Stop taking requests; close once every outstanding one is answered. Input is
        still read (and dropped) meanwhile: closing with unread input would reset the
        connection, and a reset can destroy replies the client has not read yet."""
        if self._state is _TRANSMISSION:
            self._state = _DRAINING
            self._buf = bytearray()
            self._drop_payload()  # a WRITE not received whole was never started
            if self._paused:
                self._paused = False
                self._transport.resume_reading()
        if self._state is _DRAINING and self._in_flight == 0:
            self._hang_up("")

    def _linger(self, why: str) -> None:
        """Refused an oversized WRITE: the reply is queued. Send it and a FIN, then swallow
        what the client still sends so that closing does not reset the connection (which
        could destroy the reply before the client reads it)."""
        self._log.warning("NBD client %s: %s; closing", self._peer, why)
        self._flush()
        self._state = _LINGERING
        self._buf = bytearray()
        self._timer = self._loop.call_later(LINGER_SECONDS, self._transport.abort)
        if self._transport.can_write_eof():
            self._transport.write_eof()
        else:
            self._transport.close()

    def shutdown(self) -> None:
        """Server shutdown: handshakes end now, transmission ends once outstanding
        requests are answered."""
        if self._state is _FLAGS or self._state is _OPTIONS:
            self._hang_up("")
        elif self._state is _TLS:
            self._state = _CLOSED
            self._transport.abort()
        elif self._state is _TRANSMISSION:
            self._drain()
        elif self._state is _LINGERING:
            self._state = _CLOSED
            self._transport.abort()

    # ---- handshake --------------------------------------------------------------------------

    def _negotiate(self) -> None:
        buf = self._buf
        while self._state is _FLAGS or self._state is _OPTIONS:
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return
                self._option_reply(self._skip_option, Rep.ERR_TOO_BIG,
                                   f"option data over {MAX_OPTION} bytes".encode())
                continue
            if self._state is _FLAGS:
                if len(buf) < 4:
                    return
                (flags,) = U32.unpack_from(buf)
                del buf[:4]
                if not flags & FLAG_FIXED_NEWSTYLE or flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
                    return self._hang_up(f"client flags 0x{flags:08x} (FIXED_NEWSTYLE required, "
                                         "only NO_ZEROES optional)")
                self._no_zeroes = bool(flags & FLAG_NO_ZEROES)
                self._state = _OPTIONS
                continue
            if len(buf) < OPTION.size:
                return
            magic, option, length = OPTION.unpack_from(buf)
            if magic != IHAVEOPT:
                return self._hang_up(f"option magic 0x{magic:016x} is not IHAVEOPT")
            if length > MAX_OPTION:
                if option == Opt.EXPORT_NAME or length > MAX_DISCARD:
                    return self._hang_up(f"option {_option_name(option)} with {length} bytes")
                del buf[:OPTION.size]
                self._skip, self._skip_option = length, option
                continue
            end = OPTION.size + length
            if len(buf) < end:
                return
            payload = bytes(buf[OPTION.size:end])
            del buf[:end]
            self._option(option, payload)

    def _option_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out.append(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)))
        if payload:
            self._out.append(payload)

    def _option(self, option: int, payload: bytes) -> None:
        if self._tls and self._client is None and not self._not_client:
            if option == Opt.STARTTLS:
                return self._option_starttls(payload)
            if option == Opt.EXPORT_NAME:
                return self._hang_up("EXPORT_NAME before STARTTLS on a TLS-only listener",
                                     logging.WARNING)
            if option != Opt.ABORT:
                return self._option_reply(option, Rep.ERR_TLS_REQD,
                                          b"TLS is required on this port: STARTTLS first")
        if option == Opt.GO or option == Opt.INFO:
            self._option_go(option, payload)
        elif option == Opt.EXPORT_NAME:
            self._option_export_name(payload)
        elif option == Opt.LIST:
            if payload:
                return self._option_reply(option, Rep.ERR_INVALID, b"LIST takes no data")
            if self._not_client:
                return self._option_reply(option, Rep.ERR_POLICY, self._not_client.encode())
            for name in sorted(self._visible()):
                raw = name.encode()
                self._option_reply(option, Rep.SERVER, U32.pack(len(raw)) + raw)
            self._option_reply(option, Rep.ACK)
        elif option == Opt.ABORT:
            self._option_reply(option, Rep.ACK)
            self._hang_up("")
        elif option == Opt.STARTTLS:
            if self._tls:
                self._option_reply(option, Rep.ERR_INVALID, b"TLS is on already")
            else:
                self._option_reply(option, Rep.ERR_POLICY, b"this listener is plain NBD "
                                   b"(loopback or unix socket); TLS is on nbd_tls_listen")
        else:
            self._option_reply(option, Rep.ERR_UNSUP,
                               f"option {_option_name(option)} is not supported".encode())

    def _option_starttls(self, payload: bytes) -> None:
        if payload:
            return self._option_reply(Opt.STARTTLS, Rep.ERR_INVALID, b"STARTTLS takes no payload")
        context = self._server.tls_context
        if context is None:  # (the agent gives a TLS listener its context first)
            return self._option_reply(Opt.STARTTLS, Rep.ERR_POLICY, b"no TLS context")
        self._option_reply(Opt.STARTTLS, Rep.ACK)
        if self._buf:  # the client may not send before the handshake
            return self._hang_up("data after STARTTLS, before the TLS handshake",
                                 logging.WARNING)
        self._transport.pause_reading()
        self._state = _TLS
        self._flush()
        self._tls_task = self._loop.create_task(self._start_tls(context))  # (held: the
        # loop keeps only a weak reference to a task)

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        plain = self._transport
        left = self._timer.when() - self._loop.time() if self._timer else 1.0
        try:
            transport = await self._loop.start_tls(plain, self, context, server_side=True,
                                                   ssl_handshake_timeout=max(left, 0.1))
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            self._log.warning("NBD client %s refused: TLS handshake failed: %s", self._peer,
                              tls_failure(exc))
            plain.abort()
            self.connection_lost(None)  # the TLS protocol that failed never tells us
            return
        if self._state is not _TLS or transport is None:  # closed meanwhile (by the
            if transport is not None:                    # handshake timeout, say): the
                transport.abort()                        # TLS layer, mid-handshake,
            self.connection_lost(None)                   # does not tell us
            return
        self._transport = transport
        cert = transport.get_extra_info("peercert") or {}
        subject = dict(pair for rdn in cert.get("subject", ()) for pair in rdn)
        if subject.get("organizationalUnitName") == CLIENT_OU and subject.get("commonName"):
            self._client = subject["commonName"]
            self._peer = f"{self._peer} (client {self._client!r})"
        else:
            self._not_client = (f"the certificate {subject.get('commonName', '?')!r} is not an "
                                "NBD client's (`replicator pki issue --client NAME`)")
            self._log.warning("NBD client %s refused: %s", self._peer, self._not_client)
        self._state = _OPTIONS
        if self._buf:  # options the TLS layer handed over before we resumed
            self.buffer_updated(0)

    def _grant(self, name: str) -> NbdGrant | None:
        """What this connection may do with export `name`: None when nothing (a TLS
        client not granted it); plain listeners may do everything."""
        if not self._tls:
            return _EVERYTHING
        grant = self._server.grants.get(self._client) if self._client else None
        if grant is None or name not in grant.exports and "*" not in grant.exports:
            return None
        return grant

    def _visible(self) -> dict[str, Export]:
        """The exports this connection may know of."""
        exports = self._server.exports()
        if not self._tls:
            return exports
        return {name: e for name, e in exports.items() if self._grant(name) is not None}

    def _find_export(self, raw_name: bytes) -> tuple[Export | None, str]:
        """The export called raw_name, or None and why not (naming the valid ones)."""
        if self._not_client:
            return None, self._not_client
        exports = self._visible()
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            name = None
        export = exports.get(name) if name else None
        if export is not None:
            return export, ""
        valid = ", ".join(sorted(exports)) or "(none)"
        if len(valid) > MAX_NAME_LIST:
            valid = valid[:MAX_NAME_LIST] + "..."
        if not raw_name:
            why = "an export name is required"
        else:
            why = f"no export named {raw_name[:256].decode(errors='replace')!r}"
        return None, f"{why}; exports: {valid}"

    def _option_go(self, option: int, payload: bytes) -> None:
        if len(payload) < 6:
            return self._option_reply(option, Rep.ERR_INVALID, b"GO/INFO data too short")
        (name_length,) = U32.unpack_from(payload)
        if 4 + name_length + 2 > len(payload):
            return self._option_reply(option, Rep.ERR_INVALID, b"GO/INFO name overruns the data")
        raw_name = payload[4:4 + name_length]
        (count,) = U16.unpack_from(payload, 4 + name_length)
        if len(payload) != 6 + name_length + 2 * count:
            return self._option_reply(option, Rep.ERR_INVALID,
                                      b"GO/INFO request count does not match the data")
        wanted = set(struct.unpack_from(f">{count}H", payload, 6 + name_length))
        export, why = self._find_export(raw_name)
        if export is None:
            return self._option_reply(option, Rep.ERR_UNKNOWN, why.encode())
        full = option == Opt.GO and self._server._export_full(export.name)
        if full:
            self._log.warning("NBD client %s refused: %s", self._peer, full)
            return self._option_reply(option, Rep.ERR_POLICY, full.encode())
        read_only = not self._grant(export.name).write
        self._option_reply(option, Rep.INFO, EXPORT_INFO.pack(
            Info.EXPORT, export.size, transmission_flags(export, read_only)))
        self._option_reply(option, Rep.INFO, BLOCK_INFO.pack(
            Info.BLOCK_SIZE, 1, PREFERRED_BLOCK, self._max_request))
        if Info.NAME in wanted:
            self._option_reply(option, Rep.INFO, U16.pack(Info.NAME) + export.name.encode())
        self._option_reply(option, Rep.ACK)
        if option == Opt.GO:
            self._enter_transmission(export, read_only)

    def _option_export_name(self, raw_name: bytes) -> None:
        export, why = self._find_export(raw_name)
        if export is None:
            return self._hang_up(f"EXPORT_NAME: {why}")
        full = self._server._export_full(export.name)
        if full:
            return self._hang_up(f"EXPORT_NAME refused: {full}", logging.WARNING)
        read_only = not self._grant(export.name).write
        self._out.append(EXPORT_NAME_REPLY.pack(export.size, transmission_flags(export, read_only)))
        if not self._no_zeroes:
            self._out.append(bytes(124))
        self._enter_transmission(export, read_only)

    def _enter_transmission(self, export: Export, read_only: bool) -> None:
        self._cancel_timer()
        self._export = export
        self._read_only = read_only
        self._server._joined(export.name)
        self._size = export.size
        self._state = _TRANSMISSION

    # ---- transmission -----------------------------------------------------------------------

    def _parse_requests(self) -> None:
        """Handle every complete request in the buffer (up to the back-pressure limits),
        then drop the consumed bytes in one go."""
        buf = self._buf
        end = len(buf)
        pos = 0
        export = self._export
        size = self._size
        read_only = export.read_only or self._read_only  # may change at runtime (role switch)
        max_request = self._max_request
        unpack = REQUEST.unpack_from
        reply = self._reply
        disconnect = False
        with memoryview(buf) as view:
            while end - pos >= _REQUEST_SIZE:
                if (self._in_flight >= MAX_IN_FLIGHT or self._pending_bytes >= MAX_PENDING_BYTES
                        or self._write_blocked):
                    self._paused = True
                    self._transport.pause_reading()
                    break
                magic, flags, command, handle, offset, length = unpack(buf, pos)
                if magic != REQUEST_MAGIC:
                    self._hang_up(f"request magic 0x{magic:08x} (expected 0x{REQUEST_MAGIC:08x}) "
                                  f"{pos} bytes into a batch; cannot resynchronise",
                                  logging.WARNING)
                    return
                if command == _WRITE:
                    if length > max_request:
                        reply(handle, errno.EINVAL)
                        self._linger(f"WRITE of {length} bytes exceeds max_request {max_request}")
                        return
                    start = pos + _REQUEST_SIZE
                    err = (errno.EINVAL if flags & _NOT_FUA else errno.EPERM if read_only
                           else errno.ENOSPC if offset + length > size else 0)
                    if end - start < length:
                        if not err and length >= DIRECT_PAYLOAD:
                            # Receive the rest straight into the payload's own buffer.
                            payload = bytearray(length)
                            payload[:end - start] = view[start:end]
                            self._payload_view = memoryview(payload)
                            self._payload_got = end - start
                            self._payload_write = (handle, offset, flags & _FUA != 0)
                            pos = end
                        break  # wait for the payload
                    pos = start + length
                    if err:
                        reply(handle, err)
                    elif length == 0:
                        reply(handle, 0)
                    else:
                        self._write(handle, offset, bytes(view[start:pos]), flags & _FUA != 0)
                    continue
                pos += _REQUEST_SIZE
                if command == _READ:
                    if flags & _NOT_FUA or length > max_request or offset + length > size:
                        reply(handle, errno.EINVAL)
                        continue
                    try:
                        data = export.read(offset, length)
                    except Exception as exc:  # noqa: BLE001
                        self._export_raised("read", offset, length, exc, None)
                        reply(handle, errno.EIO)
                        continue
                    if len(data) != length:
                        self._export_raised("read", offset, length, ValueError(
                            f"returned {len(data)} bytes"), None)
                        reply(handle, errno.EIO)
                        continue
                    reply(handle, 0, data)
                elif command == _WRITE_ZEROES or command == _TRIM:
                    if flags & (_NOT_ZERO_FLAGS if command == _WRITE_ZEROES else _NOT_FUA):
                        reply(handle, errno.EINVAL)
                    elif read_only:
                        reply(handle, errno.EPERM)
                    elif offset + length > size:
                        reply(handle, errno.ENOSPC)
                    elif length == 0:
                        reply(handle, 0)
                    else:
                        done = self._start(handle, 0)
                        try:
                            export.zero(offset, length, flags & _FUA != 0, done)
                        except Exception as exc:  # noqa: BLE001
                            self._export_raised("zero", offset, length, exc, done)
                elif command == _FLUSH:
                    if flags & _NOT_FUA:
                        reply(handle, errno.EINVAL)
                        continue
                    done = self._start(handle, 0)
                    try:
                        export.flush(done)
                    except Exception as exc:  # noqa: BLE001
                        self._export_raised("flush", offset, length, exc, done)
                elif command == _DISC:
                    pos = end  # the client must not send anything after DISC
                    disconnect = True
                    break
                else:
                    reply(handle, errno.EINVAL)
        if pos:
            del buf[:pos]
        if disconnect:
            self._drain()

    def _write(self, handle: int, offset: int, data, fua: bool) -> None:
        done = self._start(handle, len(data))
        try:
            self._export.write(offset, data, fua, done)
        except Exception as exc:  # noqa: BLE001
            self._export_raised("write", offset, len(data), exc, done)

    def _drop_payload(self) -> None:
        if self._payload_view is not None:
            self._payload_view.release()
        self._payload_view = None
        self._payload_got = 0

    def _start(self, handle: int, nbytes: int) -> Done:
        """Count one outstanding request; return its completion callback."""
        self._in_flight += 1
        self._pending_bytes += nbytes
        fired = False

        def done(err: int, _raised: bool = False) -> None:
            nonlocal fired
            if fired:
                if not _raised:
                    self._log.error("NBD export %r: done() called twice for handle 0x%x",
                                    self._export.name, handle)
                return
            fired = True
            self._complete(handle, err, nbytes)

        return done

    def _complete(self, handle: int, err: int, nbytes: int) -> None:
        self._in_flight -= 1
        self._pending_bytes -= nbytes
        state = self._state
        if state is _CLOSED or state is _LINGERING:
            return
        self._reply(handle, err)
        if state is _DRAINING:
            if self._in_flight == 0:
                self._hang_up("")
        elif self._paused:
            self._maybe_resume()

    def _maybe_resume(self) -> None:
        if not self._paused or self._write_blocked:
            return
        state = self._state
        if state is _TRANSMISSION:
            if (self._in_flight > MAX_IN_FLIGHT // 2
                    or self._pending_bytes > MAX_PENDING_BYTES // 2):
                return
            self._paused = False
            if self._buf:
                self._parse_requests()  # what was buffered when we stopped
            if self._paused or self._state is not _TRANSMISSION:
                return
        elif state is not _OPTIONS and state is not _FLAGS:
            return  # draining or closing: reading stays off
        self._paused = False
        self._transport.resume_reading()

    def _export_raised(self, op: str, offset: int, length: int, exc: Exception,
                       done: Done | None) -> None:
        self._export_errors += 1
        if self._export_errors <= EXPORT_ERRORS_LOGGED:
            self._log.error("NBD export %r: %s at offset %d length %d raised %r; replying EIO%s",
                            self._export.name, op, offset, length, exc,
                            "" if self._export_errors < EXPORT_ERRORS_LOGGED
                            else " (further export errors on this connection are counted)")
        if done is not None:
            done(errno.EIO, True)

    def _reply(self, handle: int, err: int, data: bytes | None = None) -> None:
        if err:
            err = NBD_ERRORS.get(err, NBD_EIO)
        out = self._out
        out.append(REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
        if data:
            out.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            if not self._receiving:
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        out = self._out
        if not out:
            return
        self._out = []
        if self._state is not _CLOSED:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))


def _option_name(option: int) -> str:
    try:
        return Opt(option).name
    except ValueError:
        return str(option)


class NbdServer:
    """Serves `exports()` (name -> Export, consulted at every handshake) over NBD."""

    def __init__(self, exports: Callable[[], Mapping[str, Export]], *,
                 max_request: int = 32 * 1024 * 1024, handshake_timeout: float = 10.0,
                 max_connections: int = 256, max_connections_per_export: int = 64,
                 fd_reserve: int = FD_RESERVE, log: logging.Logger | None = None):
        if not PREFERRED_BLOCK <= max_request <= 0xFFFFFFFF:
            raise ValueError(f"max_request {max_request} must be within "
                             f"[{PREFERRED_BLOCK}, 2**32-1]")
        self.exports = exports
        self.tls_context: ssl.SSLContext | None = None  # for STARTTLS on TLS listeners
        self.grants: Mapping[str, NbdGrant] = {}  # TLS clients: name -> what they may open
        self.max_request = max_request
        self.set_limits(handshake_timeout=handshake_timeout, max_connections=max_connections,
                        max_connections_per_export=max_connections_per_export)
        self.fd_reserve = fd_reserve
        self._per_export: dict[str, int] = {}  # connections in transmission, by export
        self.log = log or logging.getLogger("replicator.nbd")
        self.loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[tuple[asyncio.Server, str]] = []  # (server, what it listens on)
        self._server: asyncio.Server | None = None  # the first TCP one (`port`)
        self._connections: set[_Connection] = set()
        self._closing = False
        self._all_gone: asyncio.Event | None = None

    def set_limits(self, *, handshake_timeout: float, max_connections: int,
                   max_connections_per_export: int) -> None:
        """The admission limits (module docstring) from now on: each accept and handshake
        reads them, the connections already open stay (a reload lowers none of them)."""
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_connections_per_export = max_connections_per_export

    async def start(self, host: str, port: int, *, tls: bool = False) -> int:
        """Listen on host:port (0 picks a free port), with `tls` TLS only; the port."""
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(lambda: _Connection(self, tls), host, port,
                                               reuse_address=True, backlog=LISTEN_BACKLOG)
        port = server.sockets[0].getsockname()[1]
        self._servers.append((server, f"{'TLS ' if tls else ''}{host}:{port}"))
        if self._server is None:
            self._server = server
        self.log.info("NBD listening on %s:%d%s", host, port, " (TLS only)" if tls else "")
        return port

    async def start_unix(self, path: str, mode: int = 0o660, group: str | None = None) -> None:
        """Listen on the unix socket `path` (a stale one replaced), made `mode`, and owned
        by `group` (a name or gid) when given; OSError names what failed."""
        self.loop = asyncio.get_running_loop()
        gid = -1
        if group is not None:
            try:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            except KeyError:
                raise OSError(errno.EINVAL, f"nbd_socket_group {group!r}: no such group "
                                            "on this host") from None
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from an agent that was killed
        old = os.umask(0o177)  # no one else may connect before its mode is set
        try:
            server = await self.loop.create_unix_server(lambda: _Connection(self, False), path,
                                                        backlog=LISTEN_BACKLOG)
        finally:
            os.umask(old)
        os.chown(path, -1, gid)
        os.chmod(path, mode)
        self._servers.append((server, path))
        self.log.info("NBD listening on %s (mode %04o%s)", path, mode,
                      f", group {group}" if group is not None else "")

    @property
    def port(self) -> int:
        """The port of the first TCP listener."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("NbdServer.port: no TCP listener is started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def listeners(self) -> list[str]:
        return [what for server, what in self._servers]

    async def close(self) -> None:
        """Stop accepting; end handshakes; let connections in transmission answer what
        they have outstanding (for up to CLOSE_TIMEOUT seconds), then drop them."""
        if not self._servers:
            return
        servers, self._servers, self._server = self._servers, [], None
        self._closing = True
        for server, what in servers:
            server.close()
            if what.startswith("/"):
                try:
                    os.unlink(what)
                except FileNotFoundError:
                    pass
        self._all_gone = asyncio.Event()
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections:
            try:
                await asyncio.wait_for(self._all_gone.wait(), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                self.log.warning("NBD close: %d connection(s) still busy after %gs; dropping them",
                                 len(self._connections), CLOSE_TIMEOUT)
                for conn in list(self._connections):
                    conn._state = _CLOSED
                    conn._transport.abort()
                try:
                    await asyncio.wait_for(self._all_gone.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        for server, what in servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _refusal(self, transport: asyncio.BaseTransport) -> str:
        """Why a connection just accepted must be closed at once ("" to serve it)."""
        if len(self._connections) >= self.max_connections:
            return (f"{len(self._connections)} NBD connections are open "
                    f"(nbd_max_connections {self.max_connections})")
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit != resource.RLIM_INFINITY and fd >= limit - self.fd_reserve:
            return (f"descriptor {fd} is within {self.fd_reserve} of RLIMIT_NOFILE {limit}: "
                    "the rest is kept for the journal, volumes and replication")
        return ""

    def _export_full(self, name: str) -> str:
        """Why one more connection may not use export `name` ("" when it may)."""
        n = self._per_export.get(name, 0)
        if n >= self.max_connections_per_export:
            return (f"export {name!r} has {n} connections "
                    f"(nbd_max_connections_per_export {self.max_connections_per_export})")
        return ""

    def _joined(self, name: str) -> None:
        self._per_export[name] = self._per_export.get(name, 0) + 1

    def connection_counts(self) -> dict:
        """Open connections: in all, still handshaking, and in transmission per export."""
        total = len(self._connections)
        return {"connections": total,
                "handshaking": sum(c._export is None for c in self._connections),
                "per_export": dict(self._per_export)}

    def _forget(self, conn: _Connection) -> None:
        if conn in self._connections and conn._export is not None:
            name = conn._export.name
            self._per_export[name] -= 1
            if not self._per_export[name]:
                del self._per_export[name]
        self._connections.discard(conn)
        if not self._connections and self._all_gone is not None:
            self._all_gone.set()
