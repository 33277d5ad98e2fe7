"""Admin socket: a unix socket on which the agent answers one JSON request per line,
{"op": "status", ...} -> {"ok": true, "result": ...} | {"ok": false, "error": "..."}.
The socket is created mode 0600: only root (the agent's user) may operate it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Awaitable, Callable

Handler = Callable[[dict], Awaitable[object]]
MAX_REQUEST = 1 << 16


class AdminError(Exception):
    """An admin request failed; the message is meant for the operator."""


class AdminServer:
    def __init__(self, path: str, handlers: dict[str, Handler], log: logging.Logger | None = None):
        self.path = path
        self.handlers = handlers
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
            line = await reader.readline()
            try:
                request = json.loads(line)
                op = request["op"]
                handler = self.handlers[op]
            except (ValueError, KeyError, TypeError):
                reply = {"ok": False, "error": f"bad request; ops: {', '.join(sorted(self.handlers))}"}
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


def request(path: str, op: str, timeout: float = 30.0, **args) -> object:
    """Client side (blocking): send one request to the agent, return its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise AdminError(f"no agent is listening on {path} (is `replicator agent` running "
                             "with this config?)") from None
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
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
