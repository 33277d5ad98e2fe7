"""The NBD server against a raw-socket client: handshake, options, and every malformed
or out-of-range request gets the proper answer without hurting other clients."""

import errno
import socket
import struct

import pytest

from replicator.capture import nbd as N
from tests.nbd_fixtures import FileExport, nbd_server  # noqa: F401 - fixture

REQ = struct.Struct(">IHHQQI")


class Client:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (N.NBDMAGIC, N.IHAVEOPT)
        assert flags & N.FLAG_FIXED_NEWSTYLE

    def recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def closed(self):
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def start(self, flags=N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES):
        self.s.sendall(struct.pack(">I", flags))

    def option(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", N.IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self):
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == N.REPLY_MAGIC
        return opt, rep, self.recv(length)

    def go(self, name):
        raw = name.encode()
        self.option(N.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        replies = []
        while True:
            r = self.opt_reply()
            replies.append(r)
            if r[1] != N.REP_INFO:
                return replies

    def request(self, cmd, offset=0, length=0, handle=1, flags=0, data=b""):
        self.s.sendall(REQ.pack(N.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)

    def reply(self, read_len=0):
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == N.SIMPLE_REPLY_MAGIC
        return err, handle, (self.recv(read_len) if read_len and not err else b"")


@pytest.fixture
def client(nbd_server):
    srv = nbd_server()

    def connect(export="data"):
        c = Client(srv.port)
        c.start()
        if export:
            replies = c.go(export)
            assert replies[-1][1] == N.REP_ACK
        return c
    connect.server = srv
    return connect


def test_go_reports_size_flags_and_block_size(client):
    c = client(export=None)
    replies = c.go("data")
    infos = {struct.unpack(">H", d[:2])[0]: d for _, rep, d in replies if rep == N.REP_INFO}
    _, size, flags = struct.unpack(">HQH", infos[N.INFO_EXPORT])
    assert size == 8 << 20 and flags & N.TF_SEND_FLUSH and flags & N.TF_SEND_FUA
    assert flags & N.TF_CAN_MULTI_CONN and not flags & N.TF_READ_ONLY
    assert struct.unpack(">HIII", infos[N.INFO_BLOCK_SIZE])[1:] == (1, 4096, 32 << 20)


def test_list_and_unknown_or_empty_names(client):
    c = client(export=None)
    c.option(N.OPT_LIST)
    names = []
    while True:
        _, rep, data = c.opt_reply()
        if rep == N.REP_ACK:
            break
        names.append(data[4:].decode())
    assert names == ["data", "ro"]
    for name in ("nope", ""):
        (_, rep, msg), = c.go(name)
        assert rep == N.REP_ERR_UNKNOWN and b"data" in msg
    assert c.go("data")[-1][1] == N.REP_ACK  # the connection is still usable


def test_unsupported_options_and_oversized_option(client):
    c = client(export=None)
    for opt in (8, 9, 10, 99):  # STRUCTURED_REPLY, meta contexts, unknown
        c.option(opt)
        assert c.opt_reply()[1] == N.REP_ERR_UNSUP
    c.option(N.OPT_STARTTLS)
    assert c.opt_reply()[1] == N.REP_ERR_POLICY
    c.option(N.OPT_GO, b"x" * (N.MAX_OPTION + 1))
    assert c.opt_reply()[1] == N.REP_ERR_TOO_BIG
    c.option(N.OPT_GO, b"\x00\x00\x00\x10ab")  # name length beyond the data
    assert c.opt_reply()[1] == N.REP_ERR_INVALID
    assert c.go("data")[-1][1] == N.REP_ACK


def test_client_without_fixed_newstyle_is_closed(client):
    c = Client(client.server.port)
    c.start(flags=0)
    assert c.closed()


def test_export_name_unknown_closes_and_known_enters(client):
    c = client(export=None)
    c.option(N.OPT_EXPORT_NAME, b"nope")
    assert c.closed()
    c = client(export=None)
    c.option(N.OPT_EXPORT_NAME, b"data")
    size, flags = struct.unpack(">QH", c.recv(10))  # NO_ZEROES: no padding
    assert size == 8 << 20
    c.request(N.CMD_READ, 0, 4096)
    assert c.reply(4096)[0] == 0


def test_write_read_flush_zero(client):
    c = client()
    c.request(N.CMD_WRITE, 4096, 8, handle=7, flags=N.CMD_FLAG_FUA, data=b"abcdefgh")
    assert c.reply() == (0, 7, b"")
    c.request(N.CMD_READ, 4096, 8, handle=8)
    assert c.reply(8) == (0, 8, b"abcdefgh")
    c.request(N.CMD_WRITE_ZEROES, 4096, 4, handle=9)
    c.request(N.CMD_FLUSH, handle=10)
    assert [c.reply()[1] for _ in range(2)] == [9, 10]
    c.request(N.CMD_READ, 4096, 8, handle=11)
    assert c.reply(8)[2] == b"\0\0\0\0efgh"


def test_errors_keep_the_connection_usable(client):
    c = client()
    size = 8 << 20
    c.request(N.CMD_READ, size - 4, 8, handle=1)
    assert c.reply()[:2] == (errno.EINVAL, 1)
    c.request(N.CMD_WRITE, size - 4, 8, handle=2, data=b"12345678")  # payload consumed
    assert c.reply()[:2] == (errno.ENOSPC, 2)
    c.request(N.CMD_TRIM, size, 1, handle=3)
    assert c.reply()[:2] == (errno.ENOSPC, 3)
    c.request(77, handle=4)
    assert c.reply()[:2] == (errno.EINVAL, 4)
    c.request(N.CMD_READ, 0, (32 << 20) + 1, handle=5)
    assert c.reply()[:2] == (errno.EINVAL, 5)
    c.request(N.CMD_WRITE, 0, 3, handle=6, data=b"xyz")
    assert c.reply()[:2] == (0, 6)


def test_read_only_export_refuses_writes(client):
    c = client("ro")
    c.request(N.CMD_WRITE, 0, 4, handle=1, data=b"nope")
    c.request(N.CMD_TRIM, 0, 4, handle=2)
    c.request(N.CMD_READ, 0, 4, handle=3)
    assert c.reply()[:2] == (errno.EPERM, 1)
    assert c.reply()[:2] == (errno.EPERM, 2)
    assert c.reply(4)[:2] == (0, 3)


def test_oversized_write_is_refused_and_closed(client):
    c = client()
    c.request(N.CMD_WRITE, 0, (32 << 20) + 1, handle=1)
    assert c.reply()[:2] == (errno.EINVAL, 1)
    assert c.closed()
    fresh = client()
    fresh.request(N.CMD_READ, 0, 4, handle=2)
    assert fresh.reply(4)[:2] == (0, 2)  # the server still takes new clients


def test_bad_magic_closes_only_that_client(client):
    bad = client()
    good = client()
    bad.s.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert bad.closed()
    good.request(N.CMD_READ, 0, 16, handle=5)
    assert good.reply(16)[:2] == (0, 5)


@pytest.mark.parametrize("when", ["greeting", "options", "transmission"])
def test_garbage_then_server_still_serves(client, when):
    import random
    rng = random.Random(when)
    junk = bytes(rng.getrandbits(8) for _ in range(4096))
    c = Client(client.server.port)
    if when != "greeting":
        c.start()
    if when == "transmission":
        assert c.go("data")[-1][1] == N.REP_ACK
    c.s.sendall(junk)
    assert c.closed()
    ok = client()
    ok.request(N.CMD_READ, 0, 4, handle=1)
    assert ok.reply(4)[0] == 0


def test_pipelined_out_of_order_completion_and_disc(nbd_server, tmp_path):
    srv = nbd_server({"d": FileExport("d", str(tmp_path / "d.img"), 1 << 20, defer=True)})
    c = Client(srv.port)
    c.start()
    assert c.go("d")[-1][1] == N.REP_ACK
    for h in range(1, 33):
        c.request(N.CMD_WRITE, h * 512, 512, handle=h, data=bytes([h]) * 512)
    c.request(N.CMD_DISC)
    handles = [c.reply()[1] for _ in range(32)]
    assert sorted(handles) == list(range(1, 33)) and handles != sorted(handles)
    assert c.closed()
    with open(tmp_path / "d.img", "rb") as f:
        f.seek(512)
        assert f.read(512) == bytes([1]) * 512


def test_disconnect_with_requests_in_flight(nbd_server, tmp_path):
    srv = nbd_server({"d": FileExport("d", str(tmp_path / "d.img"), 1 << 20, defer=True)})
    c = Client(srv.port)
    c.start()
    c.go("d")
    for h in range(8):
        c.request(N.CMD_WRITE, 0, 512, handle=h, data=bytes(512))
    c.s.close()  # replies arrive later, for a connection that is gone
    c2 = Client(srv.port)
    c2.start()
    c2.go("d")
    c2.request(N.CMD_READ, 0, 4, handle=1)
    assert c2.reply(4)[0] == 0


def test_handshake_timeout(nbd_server):
    srv = nbd_server(handshake_timeout=0.3)
    c = Client(srv.port)
    assert c.closed()  # the server gave up on the silent client
