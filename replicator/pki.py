"""The replication PKI: one CA per installation, one certificate per node, one per NBD
client, and the CA's revocation list.

A node certificate carries the node name as subject CN and as DNS subjectAltName (and
the node's addresses as IP subjectAltNames, for NBD clients that connect by address), so
a sender verifies the target with ordinary hostname checking (server_hostname = target
node) and a receiver compares the client certificate's CN with the node named in HELLO.
An NBD client certificate (`issue_client`) has the client's name as CN, OU CLIENT_OU and
client authentication only: it names no node, so it opens no replication session, and
nbd_clients says which exports it may open. It is written as the directory libnbd
(`nbds://...?tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR`) read:
ca-cert.pem, client-cert.pem, client-key.pem.
`revoke` adds certificates to DIR/crl.pem (tls.crl on the nodes), signed by the CA.
Keys are EC P-256 and written 0600; nothing is ever overwritten unless asked (`force`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import statefile

CA_DAYS = 3650
NODE_DAYS = 825
CLIENT_DAYS = 825
CRL_DAYS = 365  # a CRL past its next update refuses every peer: `revoke` again before
CLIENT_OU = "replicator NBD client"


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


def _ca(ca_dir: str):
    try:
        with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(ca_dir, "ca.key"), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as exc:
        raise PkiError(f"cannot read the CA in {ca_dir} ({exc.strerror}); "
                       "run `replicator pki init` first") from None
    return ca_cert, ca_key


def _signed(ca_dir: str, subject: x509.Name, days: int, usages: list, names: list,
            crt: str, key_path: str) -> None:
    """A new key and certificate for `subject`, signed by the CA, written to crt/key_path."""
    ca_cert, ca_key = _ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(subject, ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    os.makedirs(os.path.dirname(crt), mode=0o755, exist_ok=True)
    statefile.write_new(key_path, _key_pem(key), 0o600)
    statefile.write_new(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def issue(ca_dir: str, node: str, out_dir: str, *, addresses: tuple[str, ...] = (),
          force: bool = False) -> bool:
    """Write OUT/NODE.crt and OUT/NODE.key signed by the CA in CA_DIR, naming the node and
    its IP `addresses`; True when made."""
    crt, key_path = os.path.join(out_dir, f"{node}.crt"), os.path.join(out_dir, f"{node}.key")
    if not force and os.path.exists(crt) and os.path.exists(key_path):
        return False
    names: list = [x509.DNSName(node)]
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise PkiError(f"--address takes an IP address; got {address!r}") from None
    _signed(ca_dir, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]), NODE_DAYS,
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], names,
            crt, key_path)
    return True


def issue_client(ca_dir: str, name: str, out_dir: str, *, force: bool = False) -> bool:
    """Write an NBD client's OUT/{ca-cert,client-cert,client-key}.pem (module docstring);
    True when made."""
    crt, key_path = os.path.join(out_dir, "client-cert.pem"), os.path.join(out_dir, "client-key.pem")
    if not force and os.path.exists(crt) and os.path.exists(key_path):
        return False
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CLIENT_OU)])
    _signed(ca_dir, subject, CLIENT_DAYS, [ExtendedKeyUsageOID.CLIENT_AUTH], [], crt, key_path)
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        statefile.write_new(os.path.join(out_dir, "ca-cert.pem"), f.read(), 0o644)
    return True


def revoke(ca_dir: str, certs: list[str]) -> tuple[int, str]:
    """Add the certificates in the files `certs` to CA_DIR/crl.pem (made if missing) and
    sign it anew, valid CRL_DAYS: (certificates revoked in all, its path). With no
    certificates it is only signed anew (its next update moved on)."""
    ca_cert, ca_key = _ca(ca_dir)
    path = os.path.join(ca_dir, "crl.pem")
    revoked: dict[int, datetime.datetime] = {}
    if os.path.exists(path):
        with open(path, "rb") as f:
            for entry in x509.load_pem_x509_crl(f.read()):
                revoked[entry.serial_number] = entry.revocation_date_utc
    now = datetime.datetime.now(datetime.timezone.utc)
    for cert_path in certs:
        try:
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read the certificate {cert_path}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
        if cert.issuer != ca_cert.subject:
            raise PkiError(f"{cert_path} was not issued by the CA in {ca_dir} "
                           f"(issuer {cert.issuer.rfc4514_string()})")
        revoked.setdefault(cert.serial_number, now)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now).next_update(now + datetime.timedelta(days=CRL_DAYS)))
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    statefile.write_new(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return len(revoked), path


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
