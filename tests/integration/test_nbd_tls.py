"""NBD with TLS (nbd_tls_listen) and the unix socket, driven by real clients: nbdinfo,
nbdcopy and qemu-io over nbds:// with a client certificate of the product's PKI work as
nbd_clients grants; no certificate, a foreign CA's, an expired or a revoked one, or a
node's are refused at the handshake; a plain client of the TLS-only port learns nothing
(FORCEDTLS); a reload picks up a new certificate and CRL without a restart."""

import datetime
import os
import socket
import ssl
import struct
import subprocess
import sys
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from replicator import pki
from replicator.nbd_protocol import (IHAVEOPT, OPTION, OPTION_REPLY, OPTION_REPLY_MAGIC, Opt,
                                     Rep)
from tests.agents import MiB, free_port, replicator_cli, wait_until
from tests.clients import qemu_io_tls, run


@pytest.fixture
def secure(topology, tmp_path):
    """Primary a (sync to b) with a TLS-only NBD port and a unix socket, no plain TCP;
    clients: app (rw on data), reader (ro on every export), stranger (nothing)."""
    topo = topology(["a", "b"], [("a", "b", "sync")], tls=True, start=False)
    a = topo["a"]
    ca = os.path.join(topo.root, "ca")
    clients = {name: os.path.join(topo.root, "clients", name)
               for name in ("app", "reader", "stranger", "revoked")}
    for name, out in clients.items():
        pki.issue_client(ca, name, out)
    pki.revoke(ca, [os.path.join(clients["revoked"], "client-cert.pem")])
    port = free_port()
    del a.config["nbd_listen"]
    a.config["tls"]["crl"] = os.path.join(ca, "crl.pem")
    a.config.update(nbd_tls_listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{free_port()}",
                    nbd_socket=os.path.join(topo.root, "a", "nbd.sock"),
                    nbd_clients={"app": {"exports": ["data"]},
                                 "reader": {"exports": "*", "access": "ro"},
                                 "revoked": {"exports": "*"}})
    a.save_config()
    topo.start()
    return topo, port, clients


def _nbds(port: int, export: str, certs: str | None) -> str:
    uri = f"nbds://127.0.0.1:{port}/{export}"
    return uri + (f"?tls-certificates={certs}" if certs else "")


def _refused(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, f"{cmd} was served:\n{p.stdout}"
    return p.stdout + p.stderr


def _log(agent) -> str:
    with open(agent.log_path) as f:
        return f.read()


def _socket_uri(agent, export: str) -> str:
    return f"nbd+unix:///{export}?socket={agent.config['nbd_socket']}"


def test_real_clients_over_nbds_with_a_client_certificate(secure, tmp_path):
    topo, port, clients = secure
    a = topo["a"]
    info = run(["nbdinfo", "--json", _nbds(port, "data", clients["app"])])
    assert '"export-size": %d' % (16 * MiB) in info and '"is_read_only": false' in info
    source = tmp_path / "image"
    source.write_bytes(os.urandom(2 * MiB))
    run(["nbdcopy", str(source), _nbds(port, "data", clients["app"])])
    out = qemu_io_tls(port, clients["app"], "data", "write -P 0x5a 4M 64k")
    assert "wrote 65536/65536 bytes" in out
    topo.wait_converged()
    with open(a.volume_path("db", "data"), "rb") as f:
        head = f.read(2 * MiB)
        f.seek(4 * MiB)
        assert f.read(64 << 10) == b"\x5a" * (64 << 10)
    assert head == source.read_bytes()
    topo.assert_identical()
    # the unix socket serves every export, with no certificate
    assert '"export-size": %d' % (4 * MiB) in run(["nbdinfo", "--json", _socket_uri(a, "log")])
    # a read-only grant: the export is read-only to that client, and a write fails
    info = run(["nbdinfo", "--json", _nbds(port, "log", clients["reader"])])
    assert '"is_read_only": true' in info
    with pytest.raises(AssertionError, match="(?i)read-only|permission|not permitted"):
        qemu_io_tls(port, clients["reader"], "log", "write -P 0x01 0 4k")
    # what a client is not granted it does not see
    listed = run(["nbdinfo", "--list", "--json", _nbds(port, "", clients["app"])])
    assert '"data"' in listed and '"log"' not in listed
    # (libnbd says ERR_UNKNOWN as ENOENT, without the server's message)
    out = _refused(["nbdinfo", _nbds(port, "log", clients["app"])])
    assert "No such file or directory for export: log" in out
    out = _refused(["nbdinfo", _nbds(port, "data", clients["stranger"])])
    assert "No such file or directory for export: data" in out
    assert '"exports": []' in run(["nbdinfo", "--list", "--json",
                                   _nbds(port, "", clients["stranger"])])


def _ca_only(topo, tmp_path) -> str:
    d = tmp_path / "ca-only"
    d.mkdir()
    with open(os.path.join(topo.root, "ca", "ca.crt"), "rb") as f:
        (d / "ca-cert.pem").write_bytes(f.read())
    return str(d)


def _expired_client(topo, tmp_path) -> str:
    """A client certificate of the CA for "app" that ended yesterday."""
    ca_dir = os.path.join(topo.root, "ca")
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(ca_dir, "ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app"),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                        pki.CLIENT_OU)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    d = tmp_path / "expired"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (d / "client-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "client-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(d)


def _foreign_client(topo, tmp_path) -> str:
    """A client certificate for "app" from another CA, with our CA trusted (so that the
    client gets as far as showing it)."""
    rogue = str(tmp_path / "rogue-ca")
    pki.init_ca(rogue, "rogue CA")
    out = str(tmp_path / "foreign")
    pki.issue_client(rogue, "app", out)
    with open(os.path.join(topo.root, "ca", "ca.crt"), "rb") as f:
        open(os.path.join(out, "ca-cert.pem"), "wb").write(f.read())
    return out


def _node_as_client(topo, tmp_path) -> str:
    """Node b's own certificate (of the CA, but a node's) presented as an NBD client's."""
    d = tmp_path / "node-b"
    d.mkdir()
    pki_dir = os.path.join(topo.root, "b", "pki")
    for src, dst in (("b.crt", "client-cert.pem"), ("b.key", "client-key.pem")):
        with open(os.path.join(pki_dir, src), "rb") as f:
            (d / dst).write_bytes(f.read())
    with open(os.path.join(topo.root, "ca", "ca.crt"), "rb") as f:
        (d / "ca-cert.pem").write_bytes(f.read())
    return str(d)


@pytest.mark.parametrize("who,logged", [
    ("none", "TLS handshake failed: peer did not return a certificate"),
    ("foreign", "TLS handshake failed: unable to get local issuer certificate"),
    ("expired", "TLS handshake failed: certificate has expired"),
    ("revoked", "TLS handshake failed: certificate revoked"),
    ("node", "the certificate 'b' is not an NBD client's"),
])
def test_clients_without_a_valid_client_certificate_are_refused(secure, tmp_path, who, logged):
    topo, port, clients = secure
    a = topo["a"]
    certs = {"none": lambda: _ca_only(topo, tmp_path),
             "foreign": lambda: _foreign_client(topo, tmp_path),
             "expired": lambda: _expired_client(topo, tmp_path),
             "revoked": lambda: clients["revoked"],
             "node": lambda: _node_as_client(topo, tmp_path)}[who]()
    _refused(["nbdinfo", _nbds(port, "data", certs)])
    _refused(["nbdinfo", "--list", _nbds(port, "", certs)])
    with pytest.raises(AssertionError):
        qemu_io_tls(port, certs, "data", "write -P 0x66 0 4k")
    line = wait_until(lambda: next((ln for ln in _log(a).splitlines()
                                    if "WARNING" in ln and logged in ln), None),
                      10, f"the refusal ({logged}) logged")
    assert "NBD client 127.0.0.1:" in line
    with open(a.volume_path("db", "data"), "rb") as f:
        assert f.read(4096) == bytes(4096)  # nothing was written


# ---- FORCEDTLS: a plain client learns nothing ---------------------------------------------

def _negotiate(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = _recv(sock, 18)
    assert greeting[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 1))  # FIXED_NEWSTYLE
    return sock


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def _option(sock: socket.socket, option: int, payload: bytes = b"") -> tuple[int, bytes]:
    sock.sendall(OPTION.pack(IHAVEOPT, option, len(payload)) + payload)
    magic, opt, reply, length = OPTION_REPLY.unpack(_recv(sock, OPTION_REPLY.size))
    assert (magic, opt) == (OPTION_REPLY_MAGIC, option)
    return reply, _recv(sock, length)


def test_a_plain_client_of_the_tls_port_is_refused_before_any_export_is_listed(secure):
    topo, port, _ = secure
    out = _refused(["nbdinfo", "--list", f"nbd://127.0.0.1:{port}"])
    assert "data" not in out and "log" not in out
    sock = _negotiate(port)
    try:
        for option in (Opt.LIST, Opt.INFO, Opt.GO):
            payload = b"" if option == Opt.LIST else struct.pack(">I", 4) + b"data" + bytes(2)
            reply, message = _option(sock, option, payload)
            assert reply == Rep.ERR_TLS_REQD and b"STARTTLS first" in message
            assert b"data" not in message
        sock.sendall(OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, 4) + b"data")
        assert sock.recv(1) == b""  # EXPORT_NAME has no error reply: closed
    finally:
        sock.close()


def _metric(agent, name: str) -> float:
    with urllib.request.urlopen(f"http://{agent.config['metrics_listen']}/metrics",
                                timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"no {name} in the scrape")


def _served_certificate(port: int, ca: str) -> x509.Certificate:
    """STARTTLS by hand; the certificate the agent showed."""
    sock = _negotiate(port)
    try:
        reply, _ = _option(sock, Opt.STARTTLS)
        assert reply == Rep.ACK
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError):
                pass  # (TLS 1.3: the server may refuse our lack of a certificate later)
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    finally:
        sock.close()


def test_a_reload_takes_a_new_certificate_and_crl_without_a_restart(secure):
    topo, port, clients = secure
    a = topo["a"]
    ca = os.path.join(topo.root, "ca")
    pid = a.status()["pid"]
    before = _served_certificate(port, os.path.join(ca, "ca.crt"))
    tls = a.status()["tls"]
    assert tls["subject"] == "CN=a" and 824 < tls["days_left"] <= 825
    assert tls["crl"]["revoked"] == 1 and 364 < tls["crl"]["days_left"] <= 365
    assert _metric(a, 'replicator_certificate_expiry_timestamp_seconds{certificate="node"}') \
        == before.not_valid_after_utc.timestamp()
    crl_end = _metric(a, "replicator_crl_next_update_timestamp_seconds")
    shown = run([sys.executable, "-m", "replicator.cli", "status", "-c", a.config_path])
    assert f"nbd on {a.config['nbd_socket']}, TLS 127.0.0.1:{port}" in shown
    assert "tls CN=a until " in shown and "(825 days)" in shown and "crl: 1 revoked" in shown
    run(["nbdinfo", _nbds(port, "data", clients["app"])])  # app is served
    # renew a's certificate and revoke app's; the agent is told by a reload
    pki.issue(ca, "a", os.path.dirname(a.config["tls"]["cert"]), addresses=("127.0.0.1",),
              force=True)
    pki.revoke(ca, [os.path.join(clients["app"], "client-cert.pem")])
    code, out = replicator_cli(a, "reload")
    assert code == 0, out
    after = _served_certificate(port, os.path.join(ca, "ca.crt"))
    assert after.serial_number != before.serial_number
    assert a.status()["tls"]["crl"]["revoked"] == 2 and a.status()["pid"] == pid
    assert _metric(a, 'replicator_certificate_expiry_timestamp_seconds{certificate="node"}') \
        == after.not_valid_after_utc.timestamp()
    assert _metric(a, "replicator_crl_next_update_timestamp_seconds") >= crl_end
    _refused(["nbdinfo", _nbds(port, "data", clients["app"])])
    run(["nbdinfo", _nbds(port, "data", clients["reader"])])  # the others go on
    # files that do not load are refused by the reload, and the old ones stay in use
    with open(os.path.join(ca, "crl.pem"), "w") as f:
        f.write("not a CRL\n")
    code, out = replicator_cli(a, "reload")
    assert code != 0 and "tls.crl" in str(out), out
    run(["nbdinfo", _nbds(port, "data", clients["reader"])])


@pytest.mark.parametrize("how", ["tls", "socket"])
def test_the_drill_writer_over_tls_and_the_unix_socket(secure, tmp_path, how):
    """The DR exercise's workload (`replicator drill ledger write`) reaches the primary
    over nbd_tls_listen with a client certificate, or over its unix socket; the ledger
    it logs checks out against the replica."""
    topo, port, clients = secure
    a, b = topo["a"], topo["b"]
    where = (["--nbd", f"127.0.0.1:{port}", "--tls-certificates", clients["app"]]
             if how == "tls" else ["--nbd", a.config["nbd_socket"]])
    ledger = str(tmp_path / "ledger")
    p = subprocess.run([sys.executable, "-m", "replicator.drill.ledger", "write", *where,
                        "--export", "data", "--ledger", ledger, "--count", "64", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert '"acknowledged": 64' in p.stdout
    topo.wait_converged()
    p = subprocess.run([sys.executable, "-m", "replicator.drill.ledger", "check", "--ledger",
                        ledger, "--image", b.volume_path("db", "data")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_drill_writer_is_refused_without_a_grant(secure, tmp_path):
    topo, port, clients = secure
    p = subprocess.run([sys.executable, "-m", "replicator.drill.ledger", "write", "--nbd",
                        f"127.0.0.1:{port}", "--tls-certificates", clients["stranger"],
                        "--export", "data", "--ledger", str(tmp_path / "ledger"), "--count", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "unknown export" in p.stderr and "exports: (none)" in p.stderr, \
        p.stderr
