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
