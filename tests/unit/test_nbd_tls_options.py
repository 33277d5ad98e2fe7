"""The NBD server's TLS-only listener against a raw-socket client: FORCEDTLS before
STARTTLS (whatever the options, nothing but ERR_TLS_REQD, ABORT's ACK or a close, and
never an export's name), STARTTLS's own errors, the handshake timeout covering the TLS
handshake, and after it the client's grant: which exports it sees and opens, read-only
or not. Real clients over nbds:// are tests/integration/test_nbd_tls.py's."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import pki
from replicator.capture import nbd as N
from replicator.config import NbdGrant, TlsConfig
from replicator.credentials import Credentials
from tests.nbd_fixtures import Client, nbd_server  # noqa: F401


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, the server's node certificate (127.0.0.1), and client directories."""
    root = str(tmp_path_factory.mktemp("pki"))
    ca = os.path.join(root, "ca")
    pki.init_ca(ca)
    pki.issue(ca, "srv", os.path.join(root, "srv"), addresses=("127.0.0.1",))
    for name in ("app", "reader", "stranger"):
        pki.issue_client(ca, name, os.path.join(root, name))
    tls = TlsConfig(ca=os.path.join(ca, "ca.crt"), cert=os.path.join(root, "srv", "srv.crt"),
                    key=os.path.join(root, "srv", "srv.key"))
    return root, Credentials(tls).nbd


def client_context(root: str, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(root, name, "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(root, name, "client-cert.pem"),
                        os.path.join(root, name, "client-key.pem"))
    return ctx


GRANTS = {"app": NbdGrant(("data",), True), "reader": NbdGrant(("*",), False)}


@pytest.fixture
def tls_server(nbd_server, certs):  # noqa: F811
    return nbd_server(tls=certs[1], grants=GRANTS, handshake_timeout=2.0)


def started(srv) -> Client:
    c = Client(srv.port)
    c.start()
    return c


def test_before_starttls_every_option_is_tls_required(tls_server):
    c = started(tls_server)
    for opt, data in ((N.Opt.LIST, b""), (N.Opt.INFO, Client.go_payload("data")),
                      (N.Opt.GO, Client.go_payload("data")), (8, b""), (0x4242, b"xy")):
        c.option(opt, data)
        got, rep, message = c.option_reply()
        assert (got, rep) == (opt, N.Rep.ERR_TLS_REQD) and b"data" not in message
    c.option(N.Opt.EXPORT_NAME, b"data")
    c.wait_closed()  # no error reply exists for EXPORT_NAME


def test_abort_before_tls_is_acknowledged(tls_server):
    c = started(tls_server)
    c.option(N.Opt.ABORT)
    assert c.option_reply()[1] == N.Rep.ACK
    c.wait_closed()


def test_starttls_with_data_is_invalid_and_negotiation_goes_on(tls_server, certs):
    c = started(tls_server)
    c.option(N.Opt.STARTTLS, b"x")
    assert c.option_reply()[1] == N.Rep.ERR_INVALID
    c.starttls(client_context(certs[0], "app"))
    assert c.go("data")[-1][0] == N.Rep.ACK


def test_bytes_pipelined_after_starttls_close_the_connection(tls_server):
    c = started(tls_server)
    c.s.sendall(struct.pack(">QII", N.IHAVEOPT, N.Opt.STARTTLS, 0) + b"\x16\x03\x01")
    assert c.option_reply()[1] == N.Rep.ACK
    c.wait_closed()


def test_a_tls_handshake_never_made_is_closed_at_the_handshake_timeout(tls_server):
    c = started(tls_server)
    c.option(N.Opt.STARTTLS)
    assert c.option_reply()[1] == N.Rep.ACK
    began = time.monotonic()
    c.s.settimeout(10)
    c.wait_closed()
    assert time.monotonic() - began < 5
    deadline = time.monotonic() + 5
    while tls_server.call(lambda: tls_server.server.connection_counts())["connections"]:
        assert time.monotonic() < deadline, "the connection was never forgotten"
        time.sleep(0.01)


def test_a_granted_client_sees_and_opens_its_exports_only(tls_server, certs):
    c = started(tls_server)
    c.starttls(client_context(certs[0], "app"))
    c.option(N.Opt.LIST)
    names = []
    while True:
        _, rep, data = c.option_reply()
        if rep == N.Rep.ACK:
            break
        names.append(data[4:].decode())
    assert names == ["data"]
    replies = c.go("ro")
    assert replies[-1][0] == N.Rep.ERR_UNKNOWN and b"exports: data" in replies[-1][1]
    c.option(N.Opt.STARTTLS)
    assert c.option_reply()[1] == N.Rep.ERR_INVALID  # TLS is on already
    assert c.go("data")[-1][0] == N.Rep.ACK
    c.request(N.Cmd.WRITE, 0, 4096, handle=7, data=b"\x01" * 4096)
    assert c.reply()[:2] == (0, 7)


def test_a_read_only_grant_makes_the_export_read_only(tls_server, certs):
    c = started(tls_server)
    c.starttls(client_context(certs[0], "reader"))
    replies = c.go("data")
    export_info = next(d for rep, d in replies if rep == N.Rep.INFO
                       and struct.unpack(">H", d[:2])[0] == N.Info.EXPORT)
    assert struct.unpack(">HQH", export_info)[2] & N.TransmissionFlag.READ_ONLY
    c.request(N.Cmd.WRITE, 0, 4096, handle=8, data=b"\x02" * 4096)
    assert c.reply()[:2] == (errno.EPERM, 8)
    c.request(N.Cmd.READ, 0, 512, handle=9)
    assert c.reply(512)[:2] == (0, 9)


def test_a_client_without_a_grant_sees_nothing(tls_server, certs):
    c = started(tls_server)
    c.starttls(client_context(certs[0], "stranger"))
    c.option(N.Opt.LIST)
    assert c.option_reply()[1] == N.Rep.ACK  # an empty list
    replies = c.go("data")
    assert replies[-1][0] == N.Rep.ERR_UNKNOWN and b"exports: (none)" in replies[-1][1]


def test_grants_are_read_at_each_option(tls_server, certs):
    """A reload changes nbd_clients live: the next GO is judged by the new grants."""
    tls_server.call(lambda: setattr(tls_server.server, "grants", {}))
    c = started(tls_server)
    c.starttls(client_context(certs[0], "app"))
    assert c.go("data")[-1][0] == N.Rep.ERR_UNKNOWN
    tls_server.call(lambda: setattr(tls_server.server, "grants", GRANTS))
    assert c.go("data")[-1][0] == N.Rep.ACK


_OPTIONS = st.lists(st.tuples(st.integers(0, 20) | st.integers(0, 2**32 - 1),
                              st.binary(max_size=64)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_OPTIONS)
def test_no_option_sequence_before_tls_tells_anything(tls_server, options):
    """Any options before STARTTLS: each is answered ERR_TLS_REQD (ABORT: ACK, then
    closed; EXPORT_NAME: closed; STARTTLS: ACK or ERR_INVALID), and no reply carries an
    export's name."""
    c = started(tls_server)
    try:
        for opt, data in options:
            c.option(opt, data)
            if opt == N.Opt.EXPORT_NAME:
                c.wait_closed()
                return
            got, rep, message = c.option_reply()
            assert got == opt and b"data" not in message and b"ro" != message
            if opt == N.Opt.STARTTLS:
                assert rep == (N.Rep.ERR_INVALID if data else N.Rep.ACK)
                return
            if opt == N.Opt.ABORT:
                assert rep == N.Rep.ACK
                c.wait_closed()
                return
            assert rep == N.Rep.ERR_TLS_REQD
    except (ConnectionError, socket.timeout) as exc:
        raise AssertionError(f"closed where a reply was due: {exc}") from None
    finally:
        c.close()
