"""The replication PKI: CA and node certificates, key modes, idempotence, the CLI."""

import json
import os
import stat
import subprocess
import sys
import threading

import pytest
from cryptography import x509

from replicator import pki


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_ca_and_node_certificates(tmp_path):
    ca = str(tmp_path / "ca")
    assert pki.init_ca(ca) is True
    ca_crt = open(os.path.join(ca, "ca.crt"), "rb").read()
    assert pki.init_ca(ca) is False  # kept, not replaced
    assert open(os.path.join(ca, "ca.crt"), "rb").read() == ca_crt
    assert _mode(os.path.join(ca, "ca.key")) == 0o600

    out = str(tmp_path / "dc1")
    assert pki.issue(ca, "dc1-app", out) is True
    assert pki.issue(ca, "dc1-app", out) is False
    assert _mode(os.path.join(out, "dc1-app.key")) == 0o600
    cert = x509.load_pem_x509_certificate(open(os.path.join(out, "dc1-app.crt"), "rb").read())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_crt))
    assert cert.subject.rfc4514_string() == "CN=dc1-app"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dc1-app"]
    before = cert.serial_number
    assert pki.issue(ca, "dc1-app", out, force=True) is True
    again = x509.load_pem_x509_certificate(open(os.path.join(out, "dc1-app.crt"), "rb").read())
    assert again.serial_number != before


def test_half_a_ca_is_not_replaced(tmp_path):
    ca = tmp_path / "ca"
    ca.mkdir()
    (ca / "ca.crt").write_text("someone's certificate")
    with pytest.raises(pki.PkiError, match="only one of"):
        pki.init_ca(str(ca))
    assert (ca / "ca.crt").read_text() == "someone's certificate"


def test_issue_without_ca_is_a_clear_error(tmp_path):
    with pytest.raises(pki.PkiError, match="pki init"):
        pki.issue(str(tmp_path / "none"), "n1", str(tmp_path / "out"))


def test_cli(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "replicator.cli", "pki", *args],
                              capture_output=True, text=True)
    ca = str(tmp_path / "ca")
    r = run("init", "--dir", ca, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["changed"] is True
    r = run("issue", "--dir", ca, "n1", "--out", str(tmp_path / "n1"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {
        "changed": True, "path": str(tmp_path / "n1" / "n1.crt")}
    r = run("issue", "--dir", ca, "n1", "--out", str(tmp_path / "n1"))
    assert r.returncode == 0 and "unchanged" in r.stdout
    r = run("issue", "--dir", str(tmp_path / "nope"), "n2")
    assert r.returncode == 1 and "pki init" in r.stderr


def test_hosts_racing_for_one_link_key_get_the_same_key(tmp_path):
    """The pki role makes each host's link keys at once, on the controller: the two
    ends of a far link ask for the same key together. One makes it; every caller ends
    up with that key; no temporary file is left."""
    from concurrent.futures import ThreadPoolExecutor
    start = threading.Barrier(16)

    def make(_):
        start.wait()
        return pki.link_key(str(tmp_path), "db-far")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(make, range(16)))
    assert sum(made for made, _ in results) == 1
    (path,) = {p for _, p in results}
    key = open(path).read().strip()
    assert len(key) == 64 and int(key, 16) >= 0
    assert os.listdir(os.path.dirname(path)) == ["db-far.key"]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_node_certificates_name_their_addresses(tmp_path):
    ca = str(tmp_path / "ca")
    pki.init_ca(ca)
    pki.issue(ca, "dc1-app", str(tmp_path), addresses=("10.213.0.11", "::1"))
    cert = x509.load_pem_x509_certificate(open(tmp_path / "dc1-app.crt", "rb").read())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dc1-app"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.213.0.11", "::1"]
    with pytest.raises(pki.PkiError, match="IP address; got 'dc1'"):
        pki.issue(ca, "dc2", str(tmp_path), addresses=("dc1",))


def test_client_certificates_are_no_node_and_in_libnbds_layout(tmp_path):
    ca = str(tmp_path / "ca")
    pki.init_ca(ca)
    out = tmp_path / "app"
    assert pki.issue_client(ca, "app", str(out)) is True
    assert pki.issue_client(ca, "app", str(out)) is False
    assert sorted(os.listdir(out)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert _mode(out / "client-key.pem") == 0o600
    assert (out / "ca-cert.pem").read_bytes() == open(os.path.join(ca, "ca.crt"), "rb").read()
    cert = x509.load_pem_x509_certificate((out / "client-cert.pem").read_bytes())
    assert cert.subject.rfc4514_string() == f"OU={pki.CLIENT_OU},CN=app"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]  # no server: no node


def test_revocations_accumulate_in_one_crl_signed_by_the_ca(tmp_path):
    ca = str(tmp_path / "ca")
    pki.init_ca(ca)
    for name in ("a", "b"):
        pki.issue_client(ca, name, str(tmp_path / name))
    assert pki.revoke(ca, []) == (0, os.path.join(ca, "crl.pem"))  # an empty CRL
    assert pki.revoke(ca, [str(tmp_path / "a" / "client-cert.pem")])[0] == 1
    count, path = pki.revoke(ca, [str(tmp_path / "b" / "client-cert.pem"),
                                  str(tmp_path / "a" / "client-cert.pem")])
    assert count == 2
    crl = x509.load_pem_x509_crl(open(path, "rb").read())
    ca_cert = x509.load_pem_x509_certificate(open(os.path.join(ca, "ca.crt"), "rb").read())
    assert crl.is_signature_valid(ca_cert.public_key())
    serials = {x509.load_pem_x509_certificate(open(tmp_path / n / "client-cert.pem", "rb")
                                              .read()).serial_number for n in ("a", "b")}
    assert {r.serial_number for r in crl} == serials
    days = (crl.next_update_utc - crl.last_update_utc).days
    assert days == pki.CRL_DAYS


def test_revoking_what_the_ca_did_not_issue_is_refused(tmp_path):
    ca, rogue = str(tmp_path / "ca"), str(tmp_path / "rogue")
    pki.init_ca(ca)
    pki.init_ca(rogue, "rogue CA")
    pki.issue_client(rogue, "x", str(tmp_path / "x"))
    with pytest.raises(pki.PkiError, match="not issued by the CA"):
        pki.revoke(ca, [str(tmp_path / "x" / "client-cert.pem")])
    with pytest.raises(pki.PkiError, match="cannot read the certificate"):
        pki.revoke(ca, [str(tmp_path / "missing.pem")])
    assert not os.path.exists(os.path.join(ca, "crl.pem"))


def test_cli_client_and_revoke(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "replicator.cli", "pki", *args],
                              capture_output=True, text=True)
    ca = str(tmp_path / "ca")
    run("init", "--dir", ca)
    r = run("issue", "--dir", ca, "--client", "app", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {
        "changed": True, "path": os.path.join(ca, "clients", "app")}
    r = run("revoke", "--dir", ca, os.path.join(ca, "clients", "app", "client-cert.pem"))
    assert r.returncode == 0 and "1 certificate(s) revoked" in r.stdout
    r = run("issue", "--dir", ca, "n1", "--address", "not-an-ip")
    assert r.returncode == 1 and "IP address" in r.stderr
