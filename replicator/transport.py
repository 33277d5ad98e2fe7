"""asyncio adapter for the sans-IO wire protocol: bytes in, events out, over TCP or
mutual TLS (the contexts: credentials.py).

A Link owns one TCP (or TLS) stream and one wire.Connection. Timeouts only surface as
asyncio.TimeoutError to the caller, which closes the link; cleanup is in one place
(`close`).

Read deadline: `next_event(timeout)` must produce a whole frame within `timeout`, plus
the time the rest of a frame whose header is in takes at MIN_FRAME_RATE. Bytes that
arrive without completing a frame are no progress: before, every read restarted the
timeout, so a frame whose body never came (a damaged length) was waited for as long as
the peer's heartbeats kept trickling into it."""

from __future__ import annotations

import asyncio

from .pki import CLIENT_OU
from .wire import NEED_DATA, Connection

READ_CHUNK = 1 << 20
# Slowest rate a frame's body may arrive at once its header is in, over the timeout's
# grace: a 1 MiB batch may take 16 s more than the heartbeat timeout (WAN links of the
# lab run at 50 Mbit/s and up).
MIN_FRAME_RATE = 64 << 10


def peer_node(writer: asyncio.StreamWriter) -> str | None:
    """The node name (subject CN) of a TLS peer's verified certificate; None on plain TCP.
    An NBD client's certificate (pki.issue_client) names no node: "NBD client NAME"."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    subject = dict(pair for rdn in cert.get("subject", ()) for pair in rdn)
    if subject.get("organizationalUnitName") == CLIENT_OU:  # no node, whatever its CN
        return f"NBD client {subject.get('commonName', '')}"
    return subject.get("commonName", "")


def peer_subject(writer: asyncio.StreamWriter) -> str | None:
    """The subject of a TLS peer's verified certificate, as `CN=b,O=...`; None on plain
    TCP. For log lines that must say who was refused."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    return ",".join(f"{_SHORT.get(key, key)}={value}"
                    for rdn in cert.get("subject", ()) for key, value in rdn)


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in the words of the check that failed (OpenSSL's
    reason codes, PEER_DID_NOT_RETURN_A_CERTIFICATE, as words)."""
    reason = getattr(exc, "reason", None)
    return (getattr(exc, "verify_message", None)
            or (reason.replace("_", " ").lower() if reason else None)
            or str(exc) or type(exc).__name__)


JOIN_BYTES = 256 << 10  # frames up to this size go to the socket as one write


class Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: Connection):
        self.reader = reader
        self.writer = writer
        self.conn = conn
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.subject = peer_subject(writer)
        self.bytes_out = 0  # written to the socket (TLS: before encryption)

    def who(self, node: str | None = None) -> str:
        """The peer as a log line names it: its node name (as it claims), address and,
        on TLS, the subject of its certificate."""
        return " ".join(filter(None, [repr(node) if node is not None else None,
                                      f"at {self.peer}",
                                      f"(certificate {self.subject})" if self.subject else None]))

    async def send(self, *events) -> None:
        # A link the peer reset is an OSError, whatever the loop: uvloop raises
        # RuntimeError on a write to a closed transport (asyncio drops it, and drain
        # raises ConnectionResetError), and RuntimeError ended the shipper silently.
        if self.writer.is_closing():
            raise ConnectionResetError(f"the link to {self.peer} is closed")
        self._write(events)
        await self.writer.drain()

    def can_post(self) -> bool:
        """A frame written now goes straight out: the link is open and nothing waits in
        its socket buffer (so posting it needs no drain)."""
        return not self.writer.is_closing() and not self.writer.transport.get_write_buffer_size()

    def post(self, *events) -> bool:
        """Send without waiting for the socket to drain, from a callback that cannot
        wait (acks, small and one per batch; the peer's reading keeps them flowing).
        False when the link is closing (nothing is sent)."""
        if self.writer.is_closing():
            return False
        self._write(events)
        return True

    def post_failure(self) -> None:
        """After a RemoteProtocolError: the one ERROR(PROTOCOL) frame saying why."""
        if not self.writer.is_closing():
            self.writer.write(self.conn.send_failure())

    def _write(self, events) -> None:
        """The frames' parts in as few socket writes as a copy allows: a transport
        sends each write() at once while its buffer is empty, so a frame written as
        header and body would cost two syscalls (and the peer two wakeups)."""
        parts = [part for ev in events for part in self.conn.send_parts(ev)]
        nbytes = sum(len(p) for p in parts)
        self.bytes_out += nbytes
        if len(parts) > 1 and nbytes <= JOIN_BYTES:
            parts = [b"".join(parts)]
        write = self.writer.write
        for part in parts:
            write(part)

    async def next_event(self, timeout: float):
        """The next event from the peer (a frame or ConnectionClosed); raises
        asyncio.TimeoutError when no whole frame arrives within `timeout` seconds (plus
        the time the rest of a started frame takes at MIN_FRAME_RATE)."""
        deadline = asyncio.get_running_loop().time() + timeout
        allowed = 0  # bytes of the frame in progress the deadline already allows for
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            missing = self.conn.missing_bytes
            if missing > allowed:  # a header came in: allow for its body once
                deadline += (missing - allowed) / MIN_FRAME_RATE
                allowed = missing
            async with asyncio.timeout_at(deadline):  # no task per read, unlike wait_for
                data = await self.reader.read(READ_CHUNK)
            self.conn.receive_data(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass
