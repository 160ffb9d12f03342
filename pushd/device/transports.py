"""
How the device reaches a courier. Small plugins behind ``ICourierTransport`` that connect
with ``reactor.connectSSL``/``connectTCP``, so that the ReconnectingClientFactory hears
about failures (endpoints would not tell it).
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import SSL, crypto
from zope.interface import Interface, implementer

from pushd import tls


class ICourierTransport(Interface):
    def connect(reactor, factory):
        """Start one connection attempt; return the IConnector."""

    def describe():
        """A short text for logs and the status report."""

    def explain(connection, reason):
        """One line saying why ``connection`` ended before its Connect was accepted."""


@implementer(ICourierTransport)
@dataclass
class TLSTransport:
    host: str
    port: int
    ca_pem: bytes
    tls_name: str | None = None
    timeout: float = 15.0

    def connect(self, reactor, factory):
        options = tls.client_options(self.tls_name or self.host, self.ca_pem, tls.COURIER_ALPN)
        return reactor.connectSSL(self.host, self.port, factory, options, timeout=self.timeout)

    def describe(self):
        return f"tls:{self.host}:{self.port}"

    def explain(self, connection, reason):
        """OpenSSL says only "certificate verify failed": verify the gateway's certificate
        again here to name why (most often "not yet valid": this device's clock is behind)."""
        why = reason.getErrorMessage()
        if not reason.check(SSL.Error) or "certificate verify failed" not in why:
            return why
        try:
            # Only the chain as sent is kept after a failed verification (not the peer's
            # certificate alone): getHandle() is the TLS transport's OpenSSL connection.
            chain = connection.getHandle().get_peer_cert_chain()
        except Exception:
            chain = None
        if not chain:
            return why
        store = crypto.X509Store()
        store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, self.ca_pem))
        try:
            crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as e:
            cert = e.certificate.to_cryptography()
            return (f"certificate verify failed: {e} ({cert.subject.rfc4514_string()}, valid "
                    f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
        return why


@implementer(ICourierTransport)
@dataclass
class TCPTransport:
    """Plain TCP, for a gateway behind a TLS-terminating proxy on a trusted link, or tests."""

    host: str
    port: int
    timeout: float = 15.0

    def connect(self, reactor, factory):
        return reactor.connectTCP(self.host, self.port, factory, timeout=self.timeout)

    def describe(self):
        return f"tcp:{self.host}:{self.port}"

    def explain(self, connection, reason):
        return reason.getErrorMessage()


def parse(description: str, ca_pem: bytes, tls_name: str | None = None):
    """``tls:HOST:PORT`` or ``tcp:HOST:PORT`` (HOST may be [v6])."""
    kind, _, rest = description.partition(":")
    host, sep, port = rest.rpartition(":")
    if kind not in ("tls", "tcp") or not sep or not host:
        raise ValueError(f"bad transport {description!r}: expected tls:HOST:PORT or tcp:HOST:PORT")
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"bad transport {description!r}: port {port!r} is not a number")
    if not 0 < port_n < 65536:
        raise ValueError(f"bad transport {description!r}: port out of range")
    host = host.strip("[]")
    if kind == "tls":
        return TLSTransport(host, port_n, ca_pem, tls_name)
    return TCPTransport(host, port_n)
