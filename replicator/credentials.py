"""The node's TLS identity: the SSL contexts made from its files (`tls`: ca, cert, key and
optionally crl), made anew by every reload, and what status says of them.

Three contexts, TLS 1.3, each requiring the peer's certificate from the CA:
    server  the replication listener; the receiver compares the certificate's node name
            with the HELLO (transport.peer_node)
    client  dialing peers; the target's name is checked (hostname checking on the DNS
            subjectAltName of its node certificate)
    nbd     nbd_tls_listen; the client is named by its certificate (pki.issue_client),
            which nbd_clients grants exports
Whoever connects reads the context when it connects, so a reload's new certificate,
CA or CRL serves every connection made after it; connections open keep theirs (as TLS
sessions do).

With `crl`, every context checks the peer's certificate against it
(VERIFY_CRL_CHECK_LEAF): a revoked certificate is refused at the handshake. OpenSSL
refuses every peer once the CRL is past its next update, so status shows that date, and
`replicator pki revoke` makes a new one.
"""

from __future__ import annotations

import datetime
import ssl

from cryptography import x509

from .config import TlsConfig


class Credentials:
    def __init__(self, tls: TlsConfig | None):
        self.tls = tls
        self.server = self.client = self.nbd = None
        self.cert: x509.Certificate | None = None
        self.crl: x509.CertificateRevocationList | None = None
        self.reload(tls)

    def reload(self, tls: TlsConfig | None) -> None:
        """Read the files again (raises OSError naming them when one cannot be used; the
        contexts in use stay)."""
        if tls is None:
            self.tls, self.server, self.client, self.nbd = None, None, None, None
            return
        contexts = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
                    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        try:
            for ctx in contexts:
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.load_cert_chain(tls.cert, tls.key)
                ctx.load_verify_locations(cafile=tls.ca)
                if tls.crl:
                    ctx.load_verify_locations(cafile=tls.crl)
                    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
                ctx.verify_mode = ssl.CERT_REQUIRED
            with open(tls.cert, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            crl = None
            if tls.crl:
                with open(tls.crl, "rb") as f:
                    crl = x509.load_pem_x509_crl(f.read())
        except (OSError, ValueError) as exc:  # ssl names neither the file nor which failed
            files = f"tls.ca {tls.ca}, tls.cert {tls.cert}, tls.key {tls.key}" + (
                f", tls.crl {tls.crl}" if tls.crl else "")
            raise OSError(getattr(exc, "errno", None), f"cannot load TLS files ({files}): "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
        self.tls, (self.server, self.client, self.nbd) = tls, contexts
        self.cert, self.crl = cert, crl

    def status(self) -> dict | None:
        """The certificate in use and the CRL: whom it names, when each ends."""
        if self.tls is None:
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        end = self.cert.not_valid_after_utc
        out = {"cert": self.tls.cert, "subject": self.cert.subject.rfc4514_string(),
               "not_after": end.isoformat(),
               "days_left": round((end - now).total_seconds() / 86400, 1), "crl": None}
        if self.crl is not None:
            next_update = self.crl.next_update_utc
            out["crl"] = {"path": self.tls.crl, "revoked": len(self.crl),
                          "next_update": next_update.isoformat() if next_update else None,
                          "days_left": round((next_update - now).total_seconds() / 86400, 1)
                          if next_update else None}
        return out
