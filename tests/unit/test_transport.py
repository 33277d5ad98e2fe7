"""transport.Link: the read deadline is per frame (issue 13 item 8): bytes that keep
arriving without completing a frame are no progress."""

import asyncio
import socket
import time

import pytest

from replicator.transport import MIN_FRAME_RATE, Link
from replicator.wire import (PROTOCOL_MAX, Connection, FrameType, Heartbeat, Hello, Role, Welcome,
                             encode_header)


async def _link_and_peer():
    ours, peer = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    peer.setblocking(False)
    return Link(reader, writer, Connection(Role.SENDER)), peer


def test_a_frame_that_never_completes_times_out_although_bytes_trickle_in():
    async def main():
        link, peer = await _link_and_peer()
        body = bytes(4096)  # the header says 4 KiB; 1 byte every 20 ms follows
        loop = asyncio.get_running_loop()

        async def trickle():
            await loop.sock_sendall(peer, bytes(encode_header(FrameType.HEARTBEAT, 0, [body])))
            for i in range(len(body)):
                await loop.sock_sendall(peer, body[i:i + 1])
                await asyncio.sleep(0.02)

        feeder = asyncio.create_task(trickle())
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await link.next_event(0.5)
            took = time.monotonic() - started
            # the timeout plus the frame's length at MIN_FRAME_RATE, not 4096 x 20 ms
            assert 0.5 <= took < 0.5 + len(body) / MIN_FRAME_RATE + 1.0, took
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            await link.close()
            peer.close()

    asyncio.run(main())


def test_whole_frames_keep_the_link_alive():
    """Heartbeats (whole frames) 0.2 s apart keep a link with a 0.5 s timeout up for
    longer than the timeout."""
    async def main():
        ours, peer = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        peer.setblocking(False)
        s, r = Connection(Role.SENDER), Connection(Role.RECEIVER)
        r.receive_data(s.send(Hello(proto_min=PROTOCOL_MAX, proto_max=PROTOCOL_MAX, features=0,
                                    node="a", group="g", target="b")))
        r.next_event()
        s.receive_data(r.send(Welcome(version=PROTOCOL_MAX, features=0, seq=0, crc=0, node="b")))
        s.next_event()
        link = Link(reader, writer, s)
        loop = asyncio.get_running_loop()
        try:
            for i in range(5):
                await asyncio.sleep(0.2)
                await loop.sock_sendall(peer, r.send(Heartbeat(sent_ns=i)))
                assert await link.next_event(0.5) == Heartbeat(sent_ns=i)
        finally:
            await link.close()
            peer.close()

    asyncio.run(main())
