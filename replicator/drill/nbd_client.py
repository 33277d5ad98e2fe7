"""A small synchronous NBD client: enough to drive a workload against an export.

Handshake (fixed newstyle only): read the server's greeting (NBDMAGIC, IHAVEOPT,
handshake flags), answer FIXED_NEWSTYLE (plus NO_ZEROES when offered), send one
NBD_Opt.GO naming the export and asking for NBD_Info.BLOCK_SIZE, collect the
NBD_REP_INFO replies (size and transmission flags, block size constraints) until
NBD_REP_ACK. With a TLS context, NBD_Opt.STARTTLS comes first and the rest runs over
TLS (the server's certificate checked against the host connected to; the client's
from `tls_context(DIR)`, the ca-cert.pem, client-cert.pem, client-key.pem layout of
`replicator pki issue --client`). A unix socket (`connect_unix`) is plain NBD. Asking for the block sizes commits this client to honour them, which
`send_write` enforces for every request. An error reply ends the session with an
`NbdError` carrying the server's message. Old-style servers and servers without GO are
refused rather than worked around.

Transmission: simple replies only (structured replies are never negotiated). Requests
are sent and replies received separately (`send_write` / `recv_reply`), so a caller
may keep several requests in flight and match replies by cookie. Only WRITE (optionally
FUA), FLUSH and DISC are implemented: that is all the drill's workload needs. A server
that does not announce SEND_FLUSH (or SEND_FUA) is not sent FLUSH (or FUA): `send_flush`
and `send_write` refuse with ValueError. A reply with a non-zero error is returned to the
caller as its errno; a protocol violation raises `NbdError`; the connection going away
raises `ConnectionError` (or `TimeoutError` when the socket timeout expires), so a
caller can tell "the server said no" from "the server is gone".
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
import ssl

from ..nbd_protocol import (
    BLOCK_INFO, CMD_FLAG_FUA, DEFAULT_BLOCK_SIZES, EXPORT_INFO, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES, GREETING, IHAVEOPT, NBDMAGIC, OLDSTYLE_MAGIC, OPTION, OPTION_REPLY,
    OPTION_REPLY_MAGIC, REP_ERROR_BIT, REP_ERROR_MEANINGS, REPLY, REQUEST, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, U16, U32, Cmd, Info, Opt, Rep, TransmissionFlag,
)

MAX_OPTION_REPLY = 64 * 1024  # longest option reply payload this client reads


class NbdError(Exception):
    """The server broke the protocol or refused the session."""


class NbdClient:
    """One transmission-phase connection to one export."""

    def __init__(self, sock: socket.socket, export: str, size: int, flags: int,
                 block_sizes: tuple[int, int, int]):
        self.sock = sock
        self.export = export
        self.size = size
        self.flags = flags
        self.min_block, self.preferred_block, self.max_block = block_sizes

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FUA)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TransmissionFlag.SEND_FLUSH)

    @classmethod
    def connect(cls, host: str, port: int, export: str, timeout: float = 30.0,
                tls: ssl.SSLContext | None = None) -> "NbdClient":
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls._handshake(sock, export, tls, host)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def connect_unix(cls, path: str, export: str, timeout: float = 30.0) -> "NbdClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return cls._handshake(sock, export, None, "")
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _handshake(cls, sock: socket.socket, export: str, tls: ssl.SSLContext | None,
                   host: str) -> "NbdClient":
        magic, opt_magic, hflags = GREETING.unpack(_recv_exact(sock, GREETING.size))
        if magic != NBDMAGIC:
            raise NbdError(f"not an NBD server (greeting {magic.to_bytes(8, 'big')!r})")
        if opt_magic == OLDSTYLE_MAGIC:
            raise NbdError("old-style NBD server: only the fixed newstyle handshake is supported")
        if opt_magic != IHAVEOPT:
            raise NbdError(f"unexpected greeting magic 0x{opt_magic:x}")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("server does not offer the fixed newstyle handshake")
        sock.sendall(U32.pack(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        if tls is not None:
            sock.sendall(OPTION.pack(IHAVEOPT, Opt.STARTTLS, 0))
            _, data = _option_reply(sock, Opt.STARTTLS, export)
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except ssl.SSLError as exc:
                raise NbdError(f"TLS with {host}: {getattr(exc, 'verify_message', None) or exc}"
                               ) from None

        name = export.encode()
        payload = U32.pack(len(name)) + name + U16.pack(1) + U16.pack(Info.BLOCK_SIZE)
        sock.sendall(OPTION.pack(IHAVEOPT, Opt.GO, len(payload)) + payload)
        size = flags = None
        block_sizes = DEFAULT_BLOCK_SIZES
        while True:
            rtype, data = _option_reply(sock, Opt.GO, export)
            if rtype == Rep.ACK:
                break
            if rtype != Rep.INFO or len(data) < 2:
                raise NbdError(f"unexpected reply type {rtype} to NBD_Opt.GO")
            (info,) = U16.unpack_from(data)
            if info == Info.EXPORT and len(data) == EXPORT_INFO.size:
                _, size, flags = EXPORT_INFO.unpack(data)
            elif info == Info.BLOCK_SIZE and len(data) == BLOCK_INFO.size:
                block_sizes = BLOCK_INFO.unpack(data)[1:]
        if size is None:
            raise NbdError("server acknowledged NBD_Opt.GO without NBD_Info.EXPORT")
        if not 1 <= block_sizes[0] <= block_sizes[2]:
            raise NbdError(f"nonsensical block size constraints {block_sizes}")
        return cls(sock, export, size, flags, block_sizes)

    def _check_io(self, offset: int, length: int) -> None:
        """Refuse a request the export's size or block size constraints forbid."""
        if offset < 0 or length < 1 or offset + length > self.size:
            raise ValueError(f"request {offset}+{length} is outside the export ({self.size} bytes)")
        if offset % self.min_block or length % self.min_block:
            raise ValueError(f"request {offset}+{length} is not aligned to the export's "
                             f"minimum block size {self.min_block}")
        if length > self.max_block:
            raise ValueError(f"request of {length} bytes exceeds the export's maximum "
                             f"{self.max_block}")

    def send_write(self, cookie: int, offset: int, data: bytes, fua: bool = False) -> None:
        self._check_io(offset, len(data))
        if fua and not self.can_fua:
            raise ValueError("the export does not accept FUA")
        flags = CMD_FLAG_FUA if fua else 0
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, flags, Cmd.WRITE, cookie, offset, len(data))
                          + data)

    def send_flush(self, cookie: int) -> None:
        """NBD_Cmd.FLUSH: its successful reply means every write whose reply arrived
        before it was sent is durable (the NBD spec's guarantee)."""
        if not self.can_flush:
            raise ValueError("the export does not accept FLUSH")
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.FLUSH, cookie, 0, 0))

    def recv_reply(self) -> tuple[int, int]:
        """(cookie, errno) of the next reply; errno 0 means success."""
        magic, error, cookie = REPLY.unpack(_recv_exact(self.sock, REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise NbdError(f"bad reply magic 0x{magic:x}")
        return cookie, error

    def close(self) -> None:
        """Say goodbye (NBD_Cmd.DISC) if the connection still works, then close it."""
        try:
            self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


def strerror(error: int) -> str:
    name = errno_mod.errorcode.get(error, str(error))
    return f"{name} ({os.strerror(error)})"


def tls_context(certs: str) -> ssl.SSLContext:
    """A client context from DIR/ca-cert.pem, client-cert.pem and client-key.pem (what
    `replicator pki issue --client` writes, and libnbd's tls-certificates reads)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(os.path.join(certs, "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(certs, "client-cert.pem"),
                            os.path.join(certs, "client-key.pem"))
    except (OSError, ssl.SSLError) as exc:
        raise NbdError(f"cannot load the client certificate in {certs} (ca-cert.pem, "
                       f"client-cert.pem, client-key.pem): {exc}") from None
    return ctx


def _option_reply(sock: socket.socket, option: int, export: str) -> tuple[int, bytes]:
    """One reply to `option`: (its type, its data); an error reply raises NbdError."""
    magic, got, rtype, length = OPTION_REPLY.unpack(_recv_exact(sock, OPTION_REPLY.size))
    if magic != OPTION_REPLY_MAGIC or got != option:
        raise NbdError(f"bad option reply (magic 0x{magic:x}, option {got})")
    if length > MAX_OPTION_REPLY:
        raise NbdError(f"option reply of {length} bytes is too long")
    data = _recv_exact(sock, length)
    if rtype & REP_ERROR_BIT:
        code = rtype & ~REP_ERROR_BIT
        what = REP_ERROR_MEANINGS.get(code, f"error {code}")
        message = data.decode(errors="replace")
        _abort(sock)
        raise NbdError(f"export {export!r}: {what}" + (f": {message}" if message else ""))
    return rtype, data


def _abort(sock: socket.socket) -> None:
    try:
        sock.sendall(OPTION.pack(IHAVEOPT, Opt.ABORT, 0))
    except OSError:
        pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the NBD server closed the connection")
        buf += chunk
    return bytes(buf)
