"""The NBD server against a raw-socket client: handshake bytes, options, every malformed
or out-of-range request, pipelining with out-of-order completion, back-pressure,
disconnects and shutdown. Each test checks the answer and that the connection (or the
server, when the connection had to go) is still usable afterwards."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
import struct
import threading
import time

import pytest

from replicator.capture import nbd as N
from tests.nbd_fixtures import (Client, DeferredExport, FileExport, MiB,  # noqa: F401
                                nbd_server)

DATA_SIZE = 8 * MiB


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def send_in_background(client: "Client", data: bytes) -> threading.Thread:
    """sendall from another thread, for tests where the server stops reading until the
    test thread does something."""
    sender = threading.Thread(target=client.s.sendall, args=(data,), daemon=True)
    sender.start()
    return sender


@pytest.fixture
def server(nbd_server):
    return nbd_server()


def connect(srv, export="data") -> Client:
    c = Client(srv.port)
    c.start()
    replies = c.go(export)
    assert replies[-1][0] == N.Rep.ACK, replies
    return c


def assert_serves(srv, export="data"):
    """A fresh client can still negotiate and read."""
    c = connect(srv, export)
    c.request(N.Cmd.READ, 0, 512, handle=99)
    assert c.reply(512)[:2] == (0, 99)
    c.close()


def infos_of(replies) -> dict[int, bytes]:
    return {struct.unpack(">H", d[:2])[0]: d for rep, d in replies if rep == N.Rep.INFO}


# ---- handshake ---------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes(server):
    c = Client(server.port, greet=False)
    assert c.recv(18) == (b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03")


def test_go_and_info_report_size_flags_block_size_and_name(server):
    c = Client(server.port)
    c.start()
    replies = c.go("data", infos=[N.Info.NAME, N.Info.BLOCK_SIZE], opt=N.Opt.INFO)
    assert replies[-1][0] == N.Rep.ACK
    infos = infos_of(replies)
    _, size, flags = struct.unpack(">HQH", infos[N.Info.EXPORT])
    assert size == DATA_SIZE
    F = N.TransmissionFlag
    assert flags == F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM \
        | F.SEND_WRITE_ZEROES | F.CAN_MULTI_CONN
    assert struct.unpack(">HIII", infos[N.Info.BLOCK_SIZE])[1:] == (1, 4096, 32 * MiB)
    assert infos[N.Info.NAME][2:] == b"data"
    # INFO does not enter transmission: options still work, then GO does
    replies = c.go("ro")
    _, size, flags = struct.unpack(">HQH", infos_of(replies)[N.Info.EXPORT])
    assert size == MiB and flags & F.READ_ONLY
    assert N.Info.NAME not in infos_of(replies)  # not asked for this time
    c.request(N.Cmd.READ, 0, 4, handle=1)
    assert c.reply(4) == (0, 1, b"ZZZZ")


def test_block_size_follows_max_request(nbd_server):
    srv = nbd_server(max_request=1 * MiB)
    c = Client(srv.port)
    c.start()
    infos = infos_of(c.go("data"))
    assert struct.unpack(">HIII", infos[N.Info.BLOCK_SIZE])[1:] == (1, 4096, MiB)


def test_list_names_every_export_and_follows_changes(server):
    def listed(c):
        c.option(N.Opt.LIST)
        names = []
        while True:
            opt, rep, data = c.option_reply()
            assert opt == N.Opt.LIST
            if rep == N.Rep.ACK:
                return names
            assert rep == N.Rep.SERVER
            (length,) = struct.unpack(">I", data[:4])
            names.append(data[4:4 + length].decode())

    c = Client(server.port)
    c.start()
    assert listed(c) == ["data", "ro"]
    server.exports["extra"] = server.exports["ro"]  # exports() is asked at each option
    assert listed(c) == ["data", "extra", "ro"]
    c.option(N.Opt.LIST, b"junk")
    assert c.option_reply()[1] == N.Rep.ERR_INVALID


@pytest.mark.parametrize("name", ["nope", "", b"\xff\xfe"], ids=["unknown", "empty", "not-utf8"])
def test_go_with_unknown_or_empty_name_is_refused_with_the_valid_names(server, name):
    c = Client(server.port)
    c.start()
    (rep, message), = c.go(name)
    assert rep == N.Rep.ERR_UNKNOWN
    assert b"data" in message and b"ro" in message
    assert c.go("data")[-1][0] == N.Rep.ACK  # the connection is still negotiating


def test_export_name_enters_with_or_without_zero_padding(server):
    for flags, padding in ((N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES, 0),
                           (N.FLAG_FIXED_NEWSTYLE, 124)):
        c = Client(server.port)
        c.start(flags)
        c.option(N.Opt.EXPORT_NAME, b"data")
        size, tflags = struct.unpack(">QH", c.recv(10))
        assert size == DATA_SIZE and tflags & N.TransmissionFlag.SEND_FLUSH
        assert c.recv(padding) == bytes(padding)
        c.request(N.Cmd.READ, 0, 8, handle=3)
        assert c.reply(8) == (0, 3, bytes(8))  # nothing between the padding and the reply
        c.close()


@pytest.mark.parametrize("name", [b"nope", b""], ids=["unknown", "empty"])
def test_export_name_unknown_closes(server, name):
    c = Client(server.port)
    c.start()
    c.option(N.Opt.EXPORT_NAME, name)
    c.wait_closed()
    assert_serves(server)


def test_unsupported_options_are_refused(server):
    c = Client(server.port)
    c.start()
    for opt in (N.Opt.STRUCTURED_REPLY, N.Opt.LIST_META_CONTEXT, N.Opt.SET_META_CONTEXT,
                N.Opt.EXTENDED_HEADERS, 4, 99, 0xFFFFFFFF):
        c.option(opt)
        got_opt, rep, _ = c.option_reply()
        assert (got_opt, rep) == (opt, N.Rep.ERR_UNSUP)
    c.option(N.Opt.STARTTLS)
    assert c.option_reply()[1] == N.Rep.ERR_POLICY
    assert c.go("data")[-1][0] == N.Rep.ACK


@pytest.mark.parametrize("payload", [
    b"", b"\x00\x00\x00", b"\x00\x00\x00\x10ab\x00\x00",  # short; name overruns
    Client.go_payload("data") + b"\x00",                     # trailing byte
    Client.go_payload("data")[:-2] + b"\x00\x02\x00\x01",    # count says 2, one given
], ids=["empty", "short", "name-overrun", "trailing", "count-mismatch"])
def test_malformed_go_is_invalid_and_negotiation_continues(server, payload):
    c = Client(server.port)
    c.start()
    c.option(N.Opt.GO, payload)
    assert c.option_reply()[1] == N.Rep.ERR_INVALID
    assert c.go("data")[-1][0] == N.Rep.ACK


def test_oversized_option_is_discarded_and_refused(server):
    c = Client(server.port)
    c.start()
    c.option(N.Opt.GO, random.Random(1).randbytes(N.MAX_OPTION + 1))
    opt, rep, _ = c.option_reply()
    assert (opt, rep) == (N.Opt.GO, N.Rep.ERR_TOO_BIG)
    c.option(N.Opt.LIST, bytes(N.MAX_OPTION * 4))
    assert c.option_reply()[1] == N.Rep.ERR_TOO_BIG
    assert c.go("data")[-1][0] == N.Rep.ACK  # every discarded byte was accounted for


def test_absurd_option_length_closes(server):
    c = Client(server.port)
    c.start()
    c.s.sendall(struct.pack(">QII", N.IHAVEOPT, N.Opt.GO, N.MAX_DISCARD + 1))
    c.wait_closed()
    c = Client(server.port)
    c.start()
    c.s.sendall(struct.pack(">QII", N.IHAVEOPT, N.Opt.EXPORT_NAME, N.MAX_OPTION + 1))
    c.wait_closed()
    assert_serves(server)


@pytest.mark.parametrize("flags", [0, N.FLAG_NO_ZEROES, N.FLAG_FIXED_NEWSTYLE | 4],
                         ids=["none", "no-zeroes-only", "unknown-bit"])
def test_bad_client_flags_close(server, flags):
    c = Client(server.port)
    c.start(flags)
    c.wait_closed()


def test_abort_is_acknowledged_then_closed(server):
    c = Client(server.port)
    c.start()
    c.option(N.Opt.ABORT, b"ignored")
    assert c.option_reply()[:2] == (N.Opt.ABORT, N.Rep.ACK)
    c.wait_closed()


def test_bad_option_magic_closes(server):
    c = Client(server.port)
    c.start()
    c.s.sendall(struct.pack(">QII", 0x1234, N.Opt.LIST, 0))
    c.wait_closed()
    assert_serves(server)


def test_handshake_timeout_closes_silent_and_slow_clients(nbd_server):
    srv = nbd_server(handshake_timeout=0.2)
    silent = Client(srv.port)
    slow = Client(srv.port)
    slow.start()
    slow.option(N.Opt.LIST)  # options are fine, but it never picks an export
    slow.option_reply(), slow.option_reply(), slow.option_reply()
    silent.wait_closed()
    slow.wait_closed()
    # a client that made it into transmission is not affected by the timer
    c = connect(srv)
    wait_for(lambda: srv.call(lambda: len(srv.server._connections)) == 1,
             "the timed-out connections to go")
    c.request(N.Cmd.READ, 0, 4, handle=1)
    assert c.reply(4)[0] == 0


def refused_at_once(port: int) -> bool:
    """A connection the server closes as soon as it accepts it (no greeting)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return s.recv(18) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def test_connections_beyond_max_connections_are_refused_at_once(nbd_server, caplog):
    srv = nbd_server(max_connections=3)
    working = connect(srv)
    idle = [Client(srv.port), Client(srv.port)]  # greeted, never negotiate
    with caplog.at_level(logging.WARNING, "replicator.nbd"):
        assert refused_at_once(srv.port)
        wait_for(lambda: "nbd_max_connections 3" in caplog.text, "the refusal logged")
    # the client in transmission is untouched
    working.request(N.Cmd.WRITE, 0, 4, handle=7, data=b"abcd")
    assert working.reply()[:2] == (0, 7)
    idle[0].close()
    wait_for(lambda: srv.call(lambda: srv.server.connection_counts())["connections"] == 2,
             "the idle connection to go")
    assert_serves(srv)
    wait_for(lambda: srv.call(lambda: srv.server.connection_counts()) ==
             {"connections": 2, "handshaking": 1, "per_export": {"data": 1}},
             "the counts to match the clients left")


def test_connections_per_export_are_limited(nbd_server):
    srv = nbd_server(max_connections_per_export=2)
    first, second = connect(srv), connect(srv)
    third = Client(srv.port)
    third.start()
    rep, data = third.go("data")[-1]
    assert rep == N.Rep.ERR_POLICY and b"nbd_max_connections_per_export 2" in data
    assert third.go("ro")[-1][0] == N.Rep.ACK  # another export has room
    by_name = Client(srv.port)
    by_name.start()
    by_name.option(N.Opt.EXPORT_NAME, b"data")
    by_name.wait_closed()
    first.close()
    wait_for(lambda: srv.call(lambda: srv.server.connection_counts())["per_export"]
             .get("data") == 1, "the closed client to be forgotten")
    again = connect(srv)
    second.request(N.Cmd.READ, 0, 4, handle=3)
    assert second.reply(4)[:2] == (0, 3)
    again.close()


def test_descriptors_near_the_limit_are_kept_for_the_write_path(nbd_server):
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    srv = nbd_server(fd_reserve=soft)  # every descriptor is "near the limit"
    assert refused_at_once(srv.port)
    assert srv.call(lambda: srv.server.connection_counts())["connections"] == 0


def test_handshake_and_requests_sent_one_byte_at_a_time(server):
    c = Client(server.port)
    stream = (struct.pack(">I", N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES)
              + struct.pack(">QII", N.IHAVEOPT, N.Opt.GO, len(Client.go_payload("data")))
              + Client.go_payload("data")
              + Client.pack(N.Cmd.WRITE, 4096, 5, handle=1) + b"hello"
              + Client.pack(N.Cmd.READ, 4096, 5, handle=2))
    for i in range(len(stream)):
        c.s.sendall(stream[i:i + 1])
    replies = []
    while True:
        _, rep, _ = c.option_reply()
        replies.append(rep)
        if rep != N.Rep.INFO:
            break
    assert replies[-1] == N.Rep.ACK
    assert c.reply() == (0, 1, b"")
    assert c.reply(5) == (0, 2, b"hello")


def test_go_followed_by_requests_in_one_segment(server):
    c = Client(server.port)
    c.start()
    payload = Client.go_payload("data")
    c.s.sendall(struct.pack(">QII", N.IHAVEOPT, N.Opt.GO, len(payload)) + payload
                + Client.pack(N.Cmd.WRITE, 0, 3, handle=1) + b"abc"
                + Client.pack(N.Cmd.READ, 0, 3, handle=2))
    while c.option_reply()[1] == N.Rep.INFO:
        pass
    assert c.reply() == (0, 1, b"")
    assert c.reply(3) == (0, 2, b"abc")


@pytest.mark.parametrize("when", ["greeting", "options", "transmission"])
def test_garbage_closes_that_client_and_the_server_still_serves(server, when):
    junk = random.Random(when).randbytes(4096)
    c = Client(server.port)
    if when != "greeting":
        c.start()
    if when == "transmission":
        assert c.go("data")[-1][0] == N.Rep.ACK
    c.s.sendall(junk)
    c.wait_closed()
    assert_serves(server)


# ---- transmission ------------------------------------------------------------------------


def test_write_read_flush_trim_zero_with_fua(server):
    c = connect(server)
    export = server.exports["data"]
    handle = 0xFEEDFACE_00000000  # the full 64 bits are echoed
    c.request(N.Cmd.WRITE, 4096, 8, handle=handle + 1, flags=N.CMD_FLAG_FUA, data=b"abcdefgh")
    assert c.reply() == (0, handle + 1, b"")
    assert export.fua_writes == 1
    c.request(N.Cmd.READ, 4096, 8, handle=handle + 2, flags=N.CMD_FLAG_FUA)
    assert c.reply(8) == (0, handle + 2, b"abcdefgh")
    c.request(N.Cmd.WRITE_ZEROES, 4096, 2, handle=3, flags=N.CMD_FLAG_NO_HOLE)
    c.request(N.Cmd.TRIM, 4098, 2, handle=4)
    c.request(N.Cmd.FLUSH, handle=5)
    assert [c.reply()[:2] for _ in range(3)] == [(0, 3), (0, 4), (0, 5)]
    c.request(N.Cmd.READ, 4096, 8, handle=6)
    assert c.reply(8)[2] == b"\0\0\0\0efgh"
    with open(export.path, "rb") as f:
        f.seek(4096)
        assert f.read(8) == b"\0\0\0\0efgh"


def test_large_writes_in_odd_pieces_mixed_with_small_requests(server):
    """Payloads of DIRECT_PAYLOAD bytes and more are received into their own buffer:
    split anywhere, followed at once by more requests, refused ones still consumed."""
    c = connect(server)
    rng = random.Random(7)
    big = [rng.randbytes(n) for n in (N.DIRECT_PAYLOAD, 3 * N.DIRECT_PAYLOAD + 17, 1 * MiB)]
    stream = b"".join([
        Client.pack(N.Cmd.WRITE, 0, len(big[0]), handle=1) + big[0],
        Client.pack(N.Cmd.WRITE, 2 * MiB + 5, 3, handle=2) + b"abc",
        Client.pack(N.Cmd.WRITE, 3 * MiB + 1, len(big[1]), handle=3) + big[1],
        Client.pack(N.Cmd.WRITE, DATA_SIZE - 4096, len(big[2]), handle=4) + big[2],  # ENOSPC
        Client.pack(N.Cmd.WRITE, 4 * MiB, len(big[2]), handle=5, flags=N.CMD_FLAG_FUA) + big[2],
        Client.pack(N.Cmd.READ, 3 * MiB + 1, len(big[1]), handle=6),
    ])
    cuts = sorted(rng.sample(range(1, len(stream)), 40)) + [len(stream)]
    at = 0
    for cut in cuts:
        c.s.sendall(stream[at:cut])
        at = cut
    assert [c.reply()[:2] for _ in range(5)] == [(0, 1), (0, 2), (0, 3), (errno.ENOSPC, 4),
                                                 (0, 5)]
    assert c.reply(len(big[1])) == (0, 6, big[1])
    export = server.exports["data"]
    with open(export.path, "rb") as f:
        assert os.pread(f.fileno(), len(big[0]), 0) == big[0]
        assert os.pread(f.fileno(), 3, 2 * MiB + 5) == b"abc"
        assert os.pread(f.fileno(), len(big[2]), 4 * MiB) == big[2]
    assert export.fua_writes == 1
    # a client gone halfway through a large payload: nothing of it is written
    c.request(N.Cmd.WRITE, 6 * MiB, MiB, handle=7)
    c.s.sendall(b"\xee" * (MiB // 2))
    c.close()
    assert_serves(server)
    with open(export.path, "rb") as f:
        assert os.pread(f.fileno(), 16, 6 * MiB) == bytes(16)


def test_zero_length_requests_succeed(server):
    c = connect(server)
    for h, cmd in enumerate((N.Cmd.READ, N.Cmd.WRITE, N.Cmd.TRIM, N.Cmd.WRITE_ZEROES), 1):
        c.request(cmd, DATA_SIZE, 0, handle=h)
        assert c.reply() == (0, h, b"")


def test_unknown_command_or_flag_is_einval_and_serving_continues(server):
    c = connect(server)
    c.request(77, handle=1)
    assert c.reply()[:2] == (errno.EINVAL, 1)
    c.request(N.Cmd.WRITE, 0, 4, handle=2, flags=1 << 4, data=b"FAST")  # FAST_ZERO
    assert c.reply()[:2] == (errno.EINVAL, 2)  # ...and the payload was skipped
    c.request(N.Cmd.READ, 0, 4, handle=3, flags=N.CMD_FLAG_NO_HOLE)
    assert c.reply()[:2] == (errno.EINVAL, 3)
    c.request(N.Cmd.WRITE_ZEROES, 0, 4, handle=4, flags=1 << 4)
    assert c.reply()[:2] == (errno.EINVAL, 4)
    c.request(5, 0, 4096, handle=5)  # NBD_CMD_CACHE: not advertised
    assert c.reply()[:2] == (errno.EINVAL, 5)
    c.request(N.Cmd.READ, 0, 4, handle=6)
    assert c.reply(4) == (0, 6, bytes(4))


def test_out_of_range_requests_and_the_next_request_still_works(server):
    c = connect(server)
    c.request(N.Cmd.READ, DATA_SIZE - 4, 8, handle=1)
    assert c.reply()[:2] == (errno.EINVAL, 1)
    c.request(N.Cmd.READ, 2**63, 8, handle=2)
    assert c.reply()[:2] == (errno.EINVAL, 2)
    # the payload of a refused WRITE is consumed: the next header is parsed correctly
    c.request(N.Cmd.WRITE, DATA_SIZE - 4, 8, handle=3, data=b"12345678")
    c.request(N.Cmd.WRITE, 2**64 - 8, 8, handle=4, data=b"12345678")
    assert c.reply()[:2] == (errno.ENOSPC, 3)
    assert c.reply()[:2] == (errno.ENOSPC, 4)
    c.request(N.Cmd.TRIM, DATA_SIZE, 1, handle=5)
    c.request(N.Cmd.WRITE_ZEROES, DATA_SIZE - 1, 2, handle=6)
    assert [c.reply()[:2] for _ in range(2)] == [(errno.ENOSPC, 5), (errno.ENOSPC, 6)]
    c.request(N.Cmd.WRITE, DATA_SIZE - 4, 4, handle=7, data=b"last")  # exactly at the end
    c.request(N.Cmd.READ, DATA_SIZE - 4, 4, handle=8)
    assert c.reply() == (0, 7, b"")
    assert c.reply(4) == (0, 8, b"last")


def test_read_only_export_refuses_writes_and_consumes_payloads(server):
    c = connect(server, "ro")
    c.request(N.Cmd.WRITE, 0, 4, handle=1, data=b"nope")
    c.request(N.Cmd.TRIM, 0, 4, handle=2)
    c.request(N.Cmd.WRITE_ZEROES, 0, 4, handle=3)
    c.request(N.Cmd.FLUSH, handle=4)
    c.request(N.Cmd.READ, 0, 4, handle=5)
    assert [c.reply()[:2] for _ in range(4)] == [
        (errno.EPERM, 1), (errno.EPERM, 2), (errno.EPERM, 3), (0, 4)]
    assert c.reply(4) == (0, 5, b"ZZZZ")
    with open(server.exports["ro"].path, "rb") as f:
        assert f.read(4) == b"ZZZZ"


def test_oversized_read_is_refused_and_the_connection_stays(nbd_server):
    srv = nbd_server(max_request=64 * 1024)
    c = connect(srv)
    c.request(N.Cmd.READ, 0, 64 * 1024 + 1, handle=1)
    assert c.reply()[:2] == (errno.EINVAL, 1)
    c.request(N.Cmd.READ, 0, 64 * 1024, handle=2)
    assert c.reply(64 * 1024)[:2] == (0, 2)
    # TRIM/WRITE_ZEROES carry no payload: larger than max_request is fine
    c.request(N.Cmd.WRITE_ZEROES, 0, MiB, handle=3)
    assert c.reply()[:2] == (0, 3)


def test_oversized_write_is_refused_then_closed(nbd_server):
    srv = nbd_server(max_request=64 * 1024)
    c = connect(srv)
    length = 256 * 1024
    c.request(N.Cmd.WRITE, 0, length, handle=1)
    try:  # the client goes on sending its payload, as a real one would
        c.s.sendall(b"\xee" * length)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert c.reply()[:2] == (errno.EINVAL, 1)  # the reply is not lost to a reset
    c.wait_closed()
    with open(srv.exports["data"].path, "rb") as f:
        assert f.read(16) == bytes(16)
    assert_serves(srv)


def test_bad_request_magic_closes_only_that_client(server):
    bad = connect(server)
    good = connect(server)
    bad.request(N.Cmd.WRITE, 0, 4, handle=1, data=b"good")
    bad.s.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert bad.reply()[:2] == (0, 1)  # what came before the bad header was served
    bad.wait_closed()
    good.request(N.Cmd.READ, 0, 4, handle=5)
    assert good.reply(4) == (0, 5, b"good")


def test_pipelined_requests_complete_out_of_order_with_their_handles(nbd_server, tmp_path):
    (tmp_path / "d.img").write_bytes(b"\xff" * MiB)
    export = DeferredExport("d", str(tmp_path / "d.img"), MiB)
    srv = nbd_server({"d": export})
    c = connect(srv, "d")
    batch = bytearray()
    for h in range(1, 65):
        batch += Client.pack(N.Cmd.WRITE, h * 512, 512, handle=h) + bytes([h]) * 512
    batch += Client.pack(N.Cmd.FLUSH, handle=1000)
    batch += Client.pack(N.Cmd.WRITE_ZEROES, 70 * 512, 512, handle=1001)
    for h in range(1002, 1008):
        batch += Client.pack(N.Cmd.TRIM, 71 * 512 + h - 1002, 1, handle=h)
    batch += Client.pack(N.Cmd.READ, 0, 1, handle=2000)  # answered at once
    c.s.sendall(batch)
    assert c.reply(1) == (0, 2000, b"\xff")  # before any of the held requests
    wait_for(lambda: export.outstanding == 72, "72 requests held")
    assert srv.call(export.release, 7) == 72  # completed in a shuffled order
    handles = []
    for _ in range(72):
        err, handle, _ = c.reply()
        assert err == 0
        handles.append(handle)
    assert sorted(handles) == [*range(1, 65), *range(1000, 1008)]
    assert handles != sorted(handles)  # really out of order
    c.request(N.Cmd.READ, 0, 72 * 512, handle=3000)
    data = c.reply(72 * 512)[2]
    assert data[:512] == b"\xff" * 512
    assert all(data[h * 512:(h + 1) * 512] == bytes([h]) * 512 for h in range(1, 65))
    assert data[70 * 512:71 * 512] == bytes(512)
    assert data[71 * 512:72 * 512] == bytes(6) + b"\xff" * 506


def test_disc_answers_outstanding_requests_then_closes(nbd_server, tmp_path):
    export = DeferredExport("d", str(tmp_path / "d.img"), MiB)
    srv = nbd_server({"d": export})
    c = connect(srv, "d")
    for h in range(1, 17):
        c.request(N.Cmd.WRITE, h * 4096, 4096, handle=h, data=bytes([h]) * 4096)
    c.request(N.Cmd.DISC)
    c.s.sendall(Client.pack(N.Cmd.WRITE, 0, 4, handle=99) + b"late")  # ignored after DISC
    wait_for(lambda: export.outstanding == 16, "16 writes held by the export")
    assert srv.call(export.release) == 16
    assert sorted(c.reply()[1] for _ in range(16)) == list(range(1, 17))
    c.wait_closed()
    assert export.calls == 16
    with open(export.path, "rb") as f:
        data = f.read()
    assert all(data[h * 4096:(h + 1) * 4096] == bytes([h]) * 4096 for h in range(1, 17))
    assert data[:4] == bytes(4)


def test_half_close_after_requests_still_gets_the_replies(nbd_server, tmp_path):
    export = DeferredExport("d", str(tmp_path / "d.img"), MiB)
    srv = nbd_server({"d": export})
    c = connect(srv, "d")
    for h in range(1, 5):
        c.request(N.Cmd.WRITE, 0, 512, handle=h, data=bytes(512))
    c.s.shutdown(socket.SHUT_WR)
    wait_for(lambda: export.outstanding == 4, "4 writes held")
    (conn,) = srv.call(lambda: list(srv.server._connections))
    wait_for(lambda: srv.call(lambda: conn._state is N._State.DRAINING), "the EOF to be seen")
    srv.call(export.release)
    assert sorted(c.reply()[1] for _ in range(4)) == [1, 2, 3, 4]
    c.wait_closed()


def test_client_vanishing_with_requests_in_flight(nbd_server, tmp_path, caplog):
    export = DeferredExport("d", str(tmp_path / "d.img"), MiB)
    srv = nbd_server({"d": export})
    c = connect(srv, "d")
    for h in range(8):
        c.request(N.Cmd.WRITE, h * 512, 512, handle=h, data=b"\x01" * 512)
    wait_for(lambda: export.outstanding == 8, "8 writes held")
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # a reset, not a clean close
    wait_for(lambda: srv.call(lambda: not srv.server._connections), "the connection to go")
    with caplog.at_level(logging.WARNING):
        assert srv.call(export.release) == 8  # completions for a connection that is gone
        assert_serves(srv, "d")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_back_pressure_bounds_requests_in_flight(nbd_server, tmp_path):
    export = DeferredExport("d", str(tmp_path / "d.img"), MiB)
    srv = nbd_server({"d": export})
    c = connect(srv, "d")
    total = 3 * N.MAX_IN_FLIGHT + 17
    sender = send_in_background(c, b"".join(Client.pack(N.Cmd.WRITE, 0, 512, handle=h)
                                            + bytes(512) for h in range(total)))
    wait_for(lambda: export.outstanding == N.MAX_IN_FLIGHT, "the in-flight limit")
    handles = []
    while len(handles) < total:
        wait_for(lambda: export.outstanding, "more requests to reach the export")
        released = srv.call(export.release)
        handles += [c.reply()[1] for _ in range(released)]
    sender.join(10)
    assert sorted(handles) == list(range(total))
    assert export.most_outstanding == N.MAX_IN_FLIGHT


def test_back_pressure_bounds_pending_write_bytes(nbd_server, tmp_path, monkeypatch):
    monkeypatch.setattr(N, "MAX_PENDING_BYTES", MiB)
    export = DeferredExport("d", str(tmp_path / "d.img"), 4 * MiB)
    srv = nbd_server({"d": export})
    c = connect(srv, "d")
    size = 64 * 1024
    sender = send_in_background(c, b"".join(Client.pack(N.Cmd.WRITE, h * size, size, handle=h)
                                            + bytes([h]) * size for h in range(40)))
    wait_for(lambda: export.outstanding == 16, "1 MiB of writes held")
    handles = []
    while len(handles) < 40:
        wait_for(lambda: export.outstanding, "more writes to reach the export")
        handles += [c.reply()[1] for _ in range(srv.call(export.release))]
    sender.join(10)
    assert sorted(handles) == list(range(40)) and export.most_outstanding == 16
    with open(export.path, "rb") as f:
        data = f.read()
    assert all(data[h * size:(h + 1) * size] == bytes([h]) * size for h in range(40))


class FaultyExport(FileExport):
    """Fails on purpose, depending on the offset (in KiB) of the request."""

    def read(self, offset, length):
        if offset == 1024:
            raise OSError(errno.EIO, "media error")
        if offset == 2048:
            return b"short"
        return super().read(offset, length)

    def write(self, offset, data, fua, done):
        kib = offset // 1024
        if kib == 1:
            raise RuntimeError("bug in the export")
        if kib == 2:
            done(0)
            raise RuntimeError("bug after completing")
        errors = {3: errno.ENOSPC, 4: errno.EDQUOT, 5: errno.EBADF, 6: errno.EROFS,
                  7: errno.ESHUTDOWN}
        done(errors.get(kib, 0))

    def zero(self, offset, length, fua, done):
        raise OSError(errno.EIO, "zero failed")

    def flush(self, done):
        done(errno.EIO)
        done(0)  # a second completion must be ignored (and logged)


def test_export_failures_become_nbd_errors_and_never_kill_the_connection(nbd_server, tmp_path,
                                                                        caplog):
    srv = nbd_server({"f": FaultyExport("f", str(tmp_path / "f.img"), MiB)})
    c = connect(srv, "f")
    expected = {1: errno.EIO, 2: 0, 3: errno.ENOSPC, 4: errno.ENOSPC, 5: errno.EIO,
                6: errno.EPERM, 7: errno.ESHUTDOWN, 8: 0}
    with caplog.at_level(logging.ERROR, logger="replicator.nbd"):
        for kib, err in expected.items():
            c.request(N.Cmd.WRITE, kib * 1024, 4, handle=kib, data=b"data")
            assert c.reply() == (err, kib, b"")
        c.request(N.Cmd.READ, 1024, 4, handle=20)
        assert c.reply()[:2] == (errno.EIO, 20)
        c.request(N.Cmd.READ, 2048, 4096, handle=21)  # returned 5 bytes instead of 4096
        assert c.reply()[:2] == (errno.EIO, 21)
        c.request(N.Cmd.TRIM, 0, 4096, handle=22)
        assert c.reply()[:2] == (errno.EIO, 22)
        c.request(N.Cmd.FLUSH, handle=23)
        assert c.reply()[:2] == (errno.EIO, 23)
        c.request(N.Cmd.READ, 8 * 1024, 4, handle=24)
        assert c.reply(4) == (0, 24, b"\0\0\0\0")  # FaultyExport.write never writes
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "bug in the export" in messages and "media error" in messages
    assert "returned 5 bytes" in messages and "called twice" in messages
    assert "bug after completing" in messages


def test_server_close_answers_outstanding_requests_first(nbd_server, tmp_path):
    export = DeferredExport("d", str(tmp_path / "d.img"), MiB)
    srv = nbd_server({"d": export})
    c = connect(srv, "d")
    negotiating = Client(srv.port)
    c.request(N.Cmd.WRITE, 0, 512, handle=7, data=bytes(512))
    wait_for(lambda: export.outstanding == 1, "the write to be held")
    closing = asyncio.run_coroutine_threadsafe(srv.server.close(), srv.loop)
    negotiating.wait_closed()  # handshakes end at once
    with pytest.raises(OSError):
        Client(srv.port)  # no longer accepting
    assert not closing.done()
    srv.call(export.release)
    assert c.reply()[:2] == (0, 7)
    c.wait_closed()
    closing.result(10)
