"""
Certificates without ceremony: the gateway's dev CA, its TLS server certificate, device
certificates, and the Connect signature that proves a device holds its key.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl

from pushd import private, wire

#: ALPN the courier offers and accepts (APNs clients offer it; Twisted aborts a handshake
#: whose ALPN matches nothing, so the listener must list it).
COURIER_ALPN = [b"apns-security-v3"]
PROVIDER_ALPN = [b"h2", b"http/1.1"]

#: How far a Connect nonce's timestamp may be from the gateway's clock.
NONCE_WINDOW = 300.0


class AuthError(Exception):
    """A Connect that does not prove a device identity issued by this gateway's CA."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key(kind: str = "ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {kind!r} (rsa or ec)")


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(pem: bytes):
    return serialization.load_pem_private_key(pem, password=None)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, atomically."""
    private.write(path, data)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int):
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(name: str = "pushd dev CA"):
    key = new_key("ec")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key(), 3650)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_cert(ca_key, ca_cert, hostnames: list, key=None):
    key = key or new_key("ec")
    sans = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), 825)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def issue_device_cert(ca_key, ca_cert, public_key, device_id: str | None = None):
    """The CA picks the device id; nothing the device claims becomes its identity."""
    if not isinstance(public_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ValueError("device keys must be RSA or EC")
    device_id = device_id or uuid.uuid4().hex
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "pushd device"),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
        ]
    )
    return (
        _builder(subject, ca_cert.subject, public_key, 3650)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def device_id_of(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise AuthError("device certificate has no single common name")
    value = names[0].value
    if isinstance(value, bytes) or len(value) != 32:
        raise AuthError("device certificate common name is not a device id")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise AuthError("device certificate common name is not a device id")
    return value


# --- the Connect proof -------------------------------------------------------


def make_nonce(now: float) -> bytes:
    return b"\x00" + struct.pack(">Q", int(now * 1000)) + secrets.token_bytes(8)


def sign_nonce(key, nonce: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return wire.SIG_RSA_PKCS1_SHA1 + key.sign(nonce, padding.PKCS1v15(), hashes.SHA1())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return wire.SIG_ECDSA_SHA256 + key.sign(nonce, ec.ECDSA(hashes.SHA256()))
    raise ValueError("unsupported key type")


def verify_connect(
    ca_cert: x509.Certificate, cert_der: bytes, nonce: bytes, signature: bytes, now: float
) -> str:
    """
    Check a Connect's certificate, nonce and signature; return the device id.
    Raises AuthError with the reason.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise AuthError("certificate is not DER")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise AuthError("certificate not issued by this gateway's device CA")
    t = _now()
    if not cert.not_valid_before_utc <= t <= cert.not_valid_after_utc:
        raise AuthError("certificate outside its validity period")
    device_id = device_id_of(cert)
    if len(nonce) != 17 or nonce[0] != 0:
        raise AuthError("nonce is not 0x00 + u64 ms + 8 random bytes")
    stamp = struct.unpack(">Q", nonce[1:9])[0] / 1000.0
    if abs(stamp - now) > NONCE_WINDOW:
        raise AuthError(f"stale nonce ({stamp - now:+.0f} s from server time)")
    public = cert.public_key()
    prefix, sig = signature[:2], signature[2:]
    try:
        if prefix == wire.SIG_RSA_PKCS1_SHA1 and isinstance(public, rsa.RSAPublicKey):
            public.verify(sig, nonce, padding.PKCS1v15(), hashes.SHA1())
        elif prefix == wire.SIG_ECDSA_SHA256 and isinstance(
            public, ec.EllipticCurvePublicKey
        ):
            public.verify(sig, nonce, ec.ECDSA(hashes.SHA256()))
        else:
            raise AuthError("signature scheme does not match the certificate key")
    except InvalidSignature:
        raise AuthError("bad signature over the nonce")
    return device_id


# --- enrolment: the device proves it knows the secret without sending it ---------


def enrol_mac(secret: bytes, *parts: bytes) -> str:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for p in parts:
        h.update(struct.pack(">I", len(p)))
        h.update(p)
    return h.hexdigest()


# --- the gateway's PKI on disk ---------------------------------------------------


@dataclass
class GatewayPKI:
    ca_key: object
    ca_cert: x509.Certificate
    server_key: object
    server_cert: x509.Certificate
    enrol_secret: bytes
    provider_key: str
    ca_path: Path

    def server_options(self, alpn: list):
        """TLS options for a listener; ``alpn`` must list every protocol a client may offer."""
        from OpenSSL import crypto

        return ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.server_key),
            certificate=crypto.X509.from_cryptography(self.server_cert),
            extraCertChain=[crypto.X509.from_cryptography(self.ca_cert)],
            acceptableProtocols=alpn,
        )


def load_or_create_pki(state_dir: Path, hostnames: list) -> GatewayPKI:
    """
    First start creates the CA, server certificate, enrolment secret and provider key;
    later starts load them (the server certificate is re-issued when the names change).
    """
    private.ensure_dir(state_dir)  # 0700, and whatever is in it 0600
    ca_key_p, ca_p = state_dir / "ca.key", state_dir / "ca.pem"
    if ca_key_p.exists() and ca_p.exists():
        ca_key = load_key(ca_key_p.read_bytes())
        ca_cert = x509.load_pem_x509_certificate(ca_p.read_bytes())
    else:
        ca_key, ca_cert = make_ca()
        write_private(ca_key_p, key_pem(ca_key))
        write_private(ca_p, cert_pem(ca_cert))

    srv_key_p, srv_p = state_dir / "server.key", state_dir / "server.pem"
    server_key = server_cert = None
    if srv_key_p.exists() and srv_p.exists():
        server_key = load_key(srv_key_p.read_bytes())
        server_cert = x509.load_pem_x509_certificate(srv_p.read_bytes())
        if _san_names(server_cert) != sorted(hostnames):
            server_cert = None
    if server_cert is None:
        server_key, server_cert = issue_server_cert(ca_key, ca_cert, hostnames, server_key)
        write_private(srv_key_p, key_pem(server_key))
        write_private(srv_p, cert_pem(server_cert))

    enrol_secret = secret_file(state_dir / "enrol.secret")
    provider_key = secret_file(state_dir / "provider.key").decode("ascii")
    return GatewayPKI(
        ca_key, ca_cert, server_key, server_cert, enrol_secret, provider_key, ca_p
    )


def secret_file(path: Path) -> bytes:
    if not path.exists():
        write_private(path, secrets.token_hex(24).encode("ascii") + b"\n")
    return path.read_bytes().strip()


def _san_names(cert: x509.Certificate) -> list:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted(str(n.value) for n in san)


def client_options(hostname: str, ca_pem: bytes, alpn: list | None = None):
    """Client TLS that verifies the gateway's name (service_identity) against its CA."""
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=ssl.Certificate.loadPEM(ca_pem),
        acceptableProtocols=alpn,
    )
