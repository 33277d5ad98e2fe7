"""Admin socket: a unix socket on which the agent answers one JSON request per line,
{"op": "status", ...} -> {"ok": true, "result": ...} | {"ok": false, "error": "..."}.
A streaming op (events) answers {"ok": true, "stream": true}, then one JSON object per
line for as long as it has any and the client stays connected.
The socket is created mode 0600: only root (the agent's user) may operate it. Should its
mode be loosened, the agent still answers no other user: each connection's peer
credentials (SO_PEERCRED) are checked, and another uid gets a clear refusal."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import AsyncIterator, Awaitable, Callable, Iterator

Handler = Callable[[dict], Awaitable[object]]
StreamHandler = Callable[[dict], AsyncIterator[dict]]
MAX_REQUEST = 1 << 16
STREAM_DRAIN_TIMEOUT = 30.0  # seconds a stream's client may leave a line unread


class AdminError(Exception):
    """An admin request failed; the message is meant for the operator."""


class AdminServer:
    def __init__(self, path: str, handlers: dict[str, Handler],
                 streams: dict[str, StreamHandler] | None = None,
                 log: logging.Logger | None = None):
        self.path = path
        self.handlers = handlers
        self.streams = streams or {}
        self.log = log or logging.getLogger("replicator.admin")
        self._server = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket from a crashed agent
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, self.path,
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server:
            self._server.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()  # (first: a client still sending gets the answer)
            refusal = _stranger(writer)
            if refusal:
                self.log.warning("admin socket: %s", refusal)
                writer.write(json.dumps({"ok": False, "error": refusal}).encode() + b"\n")
                await writer.drain()
                return
            try:
                request = json.loads(line)
                op = request["op"]
                if op in self.streams:
                    await self._stream(self.streams[op](request), reader, writer)
                    return
                handler = self.handlers[op]
            except (ValueError, KeyError, TypeError):
                ops = ", ".join(sorted({*self.handlers, *self.streams}))
                reply = {"ok": False, "error": f"bad request; ops: {ops}"}
            else:
                try:
                    reply = {"ok": True, "result": await handler(request)}
                except AdminError as exc:
                    reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError) as exc:  # ValueError: line over the limit
            self.log.warning("admin request failed: %s", exc)
        finally:
            writer.close()

    @staticmethod
    async def _stream(items: AsyncIterator[dict], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Write each of `items` as a line until it ends or the client goes away."""
        gone = asyncio.ensure_future(reader.read(1))  # EOF (or anything): the client left
        try:
            writer.write(json.dumps({"ok": True, "stream": True}).encode() + b"\n")
            while True:
                nxt = asyncio.ensure_future(anext(items, None))
                await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the client left: end the generator's step first
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    return
                item = nxt.result()
                if item is None:
                    return
                writer.write(json.dumps(item).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), STREAM_DRAIN_TIMEOUT)
        except AdminError as exc:
            writer.write(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
        except asyncio.TimeoutError:
            return  # a client that stopped reading is let go (its lines would pile up)
        finally:
            gone.cancel()
            await items.aclose()


def _stranger(writer: asyncio.StreamWriter) -> str:
    """Why the client may not use the admin socket ("" when it may: root or our uid)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return ""
    pid, uid = struct.unpack("2i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   struct.calcsize("3i"))[:8])
    if uid in (0, os.geteuid()):
        return ""
    return (f"permission denied: uid {uid} (pid {pid}) may not operate this agent; its "
            "admin socket answers root only")


def _send(path: str, op: str, args: dict, timeout: float | None) -> socket.socket:
    """A socket connected to the agent, with the request sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise AdminError(f"no agent is listening on {path} (is `replicator agent` running "
                         "with this config?)") from None
    except PermissionError:
        sock.close()
        raise AdminError(f"permission denied on {path}: the agent's admin socket is root's "
                         "only (mode 0600); run this as root") from None
    except BaseException:
        sock.close()
        raise
    return sock


def request(path: str, op: str, timeout: float = 30.0, **args) -> object:
    """Client side (blocking): send one request to the agent, return its result."""
    with _send(path, op, args, timeout) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    if not data:
        raise AdminError(f"the agent on {path} closed the connection without answering")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise AdminError(reply.get("error", "unknown error"))
    return reply["result"]


def stream(path: str, op: str, **args) -> Iterator[dict]:
    """Client side (blocking): send one streaming request, yield each object the agent
    sends, until it ends the stream."""
    with _send(path, op, args, None) as sock:
        lines = sock.makefile("rb")
        first = lines.readline()
        if not first:
            raise AdminError(f"the agent on {path} closed the connection without answering")
        reply = json.loads(first)
        if not reply.get("ok") or not reply.get("stream"):
            raise AdminError(reply.get("error", f"{op} is not a stream"))
        for line in lines:
            item = json.loads(line)
            if item.get("ok") is False:
                raise AdminError(item.get("error", "unknown error"))
            yield item
