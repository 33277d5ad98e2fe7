"""A small synchronous NBD client: enough to drive a workload against an export.

Handshake (fixed newstyle only): read the server's greeting (NBDMAGIC, IHAVEOPT,
handshake flags), answer FIXED_NEWSTYLE (plus NO_ZEROES when offered), send one
NBD_OPT_GO naming the export and asking for NBD_INFO_BLOCK_SIZE, collect the
NBD_REP_INFO replies (size and transmission flags, block size constraints) until
NBD_REP_ACK. Asking for the block sizes commits this client to honour them, which
`send_write` enforces for every request. An error reply ends the session with an
`NbdError` carrying the server's message. Old-style servers, servers without GO and
TLS are refused rather than worked around.

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
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3

CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_FLAG_FUA = 1 << 0

_GREETING = struct.Struct(">8sQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_MAX_OPTION_REPLY = 64 * 1024

_REP_ERRORS = {1: "unsupported option", 2: "refused by policy", 3: "invalid option",
               4: "platform", 5: "TLS required", 6: "unknown export", 7: "shutting down",
               8: "block size required", 9: "too big"}


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
        return bool(self.flags & TFLAG_READ_ONLY)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FUA)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FLUSH)

    @classmethod
    def connect(cls, host: str, port: int, export: str, timeout: float = 30.0) -> "NbdClient":
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls._handshake(sock, export)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _handshake(cls, sock: socket.socket, export: str) -> "NbdClient":
        magic, opt_magic, hflags = _GREETING.unpack(_recv_exact(sock, _GREETING.size))
        if magic != NBDMAGIC:
            raise NbdError(f"not an NBD server (greeting {magic!r})")
        if opt_magic == OLDSTYLE_MAGIC:
            raise NbdError("old-style NBD server: only the fixed newstyle handshake is supported")
        if opt_magic != IHAVEOPT:
            raise NbdError(f"unexpected greeting magic 0x{opt_magic:x}")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("server does not offer the fixed newstyle handshake")
        sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))

        name = export.encode()
        payload = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        sock.sendall(_OPTION.pack(IHAVEOPT, OPT_GO, len(payload)) + payload)
        size = flags = None
        block_sizes = (1, 4096, 32 * 1024 * 1024)  # the spec's defaults when not announced
        while True:
            magic, option, rtype, length = _OPTION_REPLY.unpack(
                _recv_exact(sock, _OPTION_REPLY.size))
            if magic != OPTION_REPLY_MAGIC or option != OPT_GO:
                raise NbdError(f"bad option reply (magic 0x{magic:x}, option {option})")
            if length > _MAX_OPTION_REPLY:
                raise NbdError(f"option reply of {length} bytes is too long")
            data = _recv_exact(sock, length)
            if rtype & REP_ERROR_BIT:
                code = rtype & ~REP_ERROR_BIT
                what = _REP_ERRORS.get(code, f"error {code}")
                message = data.decode(errors="replace")
                _abort(sock)
                raise NbdError(f"export {export!r}: {what}" + (f": {message}" if message else ""))
            if rtype == REP_ACK:
                break
            if rtype != REP_INFO or len(data) < 2:
                raise NbdError(f"unexpected reply type {rtype} to NBD_OPT_GO")
            info = struct.unpack_from(">H", data)[0]
            if info == INFO_EXPORT and len(data) == 12:
                size, flags = struct.unpack_from(">QH", data, 2)
            elif info == INFO_BLOCK_SIZE and len(data) == 14:
                block_sizes = struct.unpack_from(">III", data, 2)
        if size is None:
            raise NbdError("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
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
        self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, flags, CMD_WRITE, cookie, offset,
                                        len(data)) + data)

    def send_flush(self, cookie: int) -> None:
        """NBD_CMD_FLUSH: its successful reply means every write whose reply arrived
        before it was sent is durable (the NBD spec's guarantee)."""
        if not self.can_flush:
            raise ValueError("the export does not accept FLUSH")
        self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_FLUSH, cookie, 0, 0))

    def recv_reply(self) -> tuple[int, int]:
        """(cookie, errno) of the next reply; errno 0 means success."""
        magic, error, cookie = _REPLY.unpack(_recv_exact(self.sock, _REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise NbdError(f"bad reply magic 0x{magic:x}")
        return cookie, error

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) if the connection still works, then close it."""
        try:
            self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


def strerror(error: int) -> str:
    name = errno_mod.errorcode.get(error, str(error))
    return f"{name} ({os.strerror(error)})"


def _abort(sock: socket.socket) -> None:
    try:
        sock.sendall(_OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
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
