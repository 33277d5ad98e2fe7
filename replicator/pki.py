"""The replication PKI: one CA per installation, one certificate per node.

A node certificate carries the node name as subject CN and as DNS subjectAltName, so a
sender verifies the target with ordinary hostname checking (server_hostname = target
node) and a receiver compares the client certificate's CN with the node named in HELLO.
Keys are EC P-256 and written 0600; nothing is ever overwritten unless asked (`force`).
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import statefile

CA_DAYS = 3650
NODE_DAYS = 825


class PkiError(Exception):
    pass


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def init_ca(directory: str, name: str = "replicator CA") -> bool:
    """Create DIR/ca.crt and DIR/ca.key unless both exist; True when something was made."""
    crt, key_path = os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key")
    if os.path.exists(crt) and os.path.exists(key_path):
        return False
    if os.path.exists(crt) or os.path.exists(key_path):
        raise PkiError(f"{directory} holds only one of ca.crt/ca.key; refusing to replace it")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(subject, subject, key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    statefile.write_new(key_path, _key_pem(key), 0o600)
    statefile.write_new(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


def issue(ca_dir: str, node: str, out_dir: str, *, force: bool = False) -> bool:
    """Write OUT/NODE.crt and OUT/NODE.key signed by the CA in CA_DIR; True when made."""
    crt, key_path = os.path.join(out_dir, f"{node}.crt"), os.path.join(out_dir, f"{node}.key")
    if not force and os.path.exists(crt) and os.path.exists(key_path):
        return False
    try:
        with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(ca_dir, "ca.key"), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as exc:
        raise PkiError(f"cannot read the CA in {ca_dir} ({exc.strerror}); "
                       "run `replicator pki init` first") from None
    os.makedirs(out_dir, mode=0o755, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])
    cert = (_builder(subject, ca_cert.subject, key.public_key(), NODE_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    statefile.write_new(key_path, _key_pem(key), 0o600)
    statefile.write_new(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


def link_key(directory: str, name: str) -> tuple[bool, str]:
    """DIR/links/NAME.key, a far link's key for processing offload (64 hex digits, read by
    offload/codec.py load_key), made unless it exists: (made, its path)."""
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"a link key name is a plain file name; got {name!r}")
    links = os.path.join(directory, "links")
    path = os.path.join(links, f"{name}.key")
    if os.path.exists(path):
        return False, path
    os.makedirs(links, mode=0o700, exist_ok=True)
    # (the role makes each host's keys at once: two hosts of one far link race for it)
    return statefile.create(path, os.urandom(32).hex().encode() + b"\n", 0o600), path
