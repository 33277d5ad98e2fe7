"""asyncio adapter for the sans-IO wire protocol: bytes in, events out.

A Link owns one TCP stream and one wire.Connection. Timeouts only surface as
asyncio.TimeoutError to the caller, which closes the link; cleanup is in one place
(`close`)."""

from __future__ import annotations

import asyncio

from .wire import NEED_DATA, Connection

READ_CHUNK = 1 << 20


class Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: Connection):
        self.reader = reader
        self.writer = writer
        self.conn = conn
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def send(self, *events) -> None:
        self.writer.write(b"".join(self.conn.send(ev) for ev in events))
        await self.writer.drain()

    async def next_event(self, timeout: float):
        """The next event from the peer (a frame or ConnectionClosed); raises
        asyncio.TimeoutError when the peer stays silent for `timeout` seconds."""
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            data = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
            self.conn.receive_data(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError):
            pass
