"""
Certificates without ceremony: the gateway's dev CA, its TLS server certificate, device
certificates, and the Connect signature that proves a device holds its key.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
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

#: TLS 1.2 suites the listeners accept: ECDHE (forward secrecy) with an AEAD cipher only, for
#: ECDSA keys (the default) and RSA keys (state directories made before ECDSA was the
#: default). Twisted's default list also offered CBC with SHA-1 (ECDHE-ECDSA-AES128-SHA ...).
#: TLS 1.3 keeps OpenSSL's suites, all AEAD.
SERVER_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])

#: How far a Connect nonce's timestamp may be from the gateway's clock.
NONCE_WINDOW = 300.0

#: The TLS exporter (RFC 5705; RFC 8446 section 7.5) a pushd device signs with its nonce,
#: binding its Connect to the one TLS connection it travels on (docs/protocol.md).
CONNECT_EXPORTER_LABEL = b"EXPORTER-pushd-connect"
CONNECT_EXPORTER_LENGTH = 32


class AuthError(Exception):
    """A Connect that does not prove a device identity issued by this gateway's CA."""


class NoExporter(Exception):
    """This connection has no TLS exporter a Connect can safely be bound to."""


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


#: Every certificate is valid from an hour before it is made, as Let's Encrypt backdates its
#: certificates: a device whose clock is behind by less than that still accepts a gateway
#: installed a minute ago. With 5 minutes, a device clock 8 minutes behind failed the TLS
#: handshake until the gateway's CA was 8 minutes old (docs/reliability.md, finding 2).
BACKDATE = 3600.0


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: float, backdate: float = BACKDATE):
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=backdate))
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


#: Device certificates' default lifetime; the device daemon renews at about 2/3 of it.
DEVICE_CERT_DAYS = 365.0
#: EC curves accepted for device keys (Connect signs ECDSA-SHA256; P-521 buys nothing here).
DEVICE_CURVES = ("secp256r1", "secp384r1")
MIN_RSA_BITS = 2048


class KeyPolicyError(ValueError):
    """A device key this gateway does not accept (too weak, or of another kind)."""


def check_device_key(public_key) -> None:
    """EC P-256/P-384 or RSA >= 2048 bits (odd exponent >= 65537); raise KeyPolicyError otherwise.
    An RSA-512 key was enrolled and connected before this check (factored in hours)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in DEVICE_CURVES:
            raise KeyPolicyError(f"EC curve {public_key.curve.name} refused: device keys must be EC P-256/P-384 "
                                 f"or RSA >= {MIN_RSA_BITS} bits")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyPolicyError(f"RSA key of {public_key.key_size} bits refused: device keys must be "
                                 f"RSA >= {MIN_RSA_BITS} bits or EC P-256/P-384")
        e = public_key.public_numbers().e
        if e < 65537 or e % 2 == 0:
            raise KeyPolicyError(f"RSA public exponent {e} refused (odd, >= 65537)")
        return
    raise KeyPolicyError(f"{type(public_key).__name__} refused: device keys must be EC P-256/P-384 "
                         f"or RSA >= {MIN_RSA_BITS} bits")


def key_fingerprint(public_key) -> str:
    """SHA-256 of the SubjectPublicKeyInfo: one key, one enrolment (a replayed CSR is refused)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def cert_fingerprint(cert_der: bytes) -> str:
    """What the device registry knows a certificate by: SHA-256 of its DER (cheap on every Connect)."""
    return hashlib.sha256(cert_der).hexdigest()


def issue_device_cert(ca_key, ca_cert, public_key, device_id: str | None = None, days: float = DEVICE_CERT_DAYS):
    """The CA picks the device id; nothing the device claims becomes its identity."""
    check_device_key(public_key)
    device_id = device_id or uuid.uuid4().hex
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "pushd device"),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
        ]
    )
    # Backdated as the others (BACKDATE), but never by more than a hundredth of the lifetime:
    # the device renews at a fraction of not_before..not_after.
    backdate = min(BACKDATE, days * 86400 / 100)
    return (
        _builder(subject, ca_cert.subject, public_key, days, backdate)
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


def nonce_time(nonce: bytes) -> float:
    """The UNIX time a well-formed nonce (checked by verify_connect) was made at."""
    return struct.unpack(">Q", nonce[1:9])[0] / 1000.0


def is_tls(transport) -> bool:
    """Whether ``transport`` is a Twisted TLS transport (its handle a pyOpenSSL Connection)."""
    from OpenSSL import SSL

    get = getattr(transport, "getHandle", None)
    return get is not None and isinstance(get(), SSL.Connection)


def session_exporter(transport) -> bytes:
    """
    The Connect exporter of the TLS connection under ``transport`` (a Twisted TLS
    transport), the same on both ends of that connection and on no other.
    Raises NoExporter with the reason where there is none to trust: not TLS (plain TCP
    behind a terminating proxy), handshake unfinished, or TLS 1.2 without the extended
    master secret (RFC 7627: without it a man in the middle can give two connections
    the same master secret, hence the same exporter). OpenSSL offers and accepts the
    extension by default, so TLS 1.2 between pushd peers has it.
    """
    from OpenSSL import SSL

    if not is_tls(transport):
        raise NoExporter("not a TLS connection")
    conn = transport.getHandle()
    if conn.get_finished() is None or conn.get_peer_finished() is None:
        raise NoExporter("TLS handshake not finished")
    if conn.get_protocol_version_name() != "TLSv1.3" and not _extended_master_secret(conn):
        raise NoExporter(f"{conn.get_protocol_version_name()} without extended master secret")
    try:
        return conn.export_keying_material(CONNECT_EXPORTER_LABEL, CONNECT_EXPORTER_LENGTH)
    except SSL.Error as e:
        raise NoExporter(f"TLS exporter failed: {e}")


def _extended_master_secret(conn) -> bool:
    """Whether a TLS 1.2 session used RFC 7627's extended master secret (pyOpenSSL has
    no public call for it; cryptography's bindings do)."""
    try:
        from OpenSSL._util import lib

        return lib.SSL_get_extms_support(conn._ssl) == 1
    except (ImportError, AttributeError):  # unknown: not safe to bind
        return False


def sign_nonce(key, nonce: bytes, exporter: bytes = b"") -> bytes:
    """The Connect signature: over the nonce alone (APNs), or over nonce || exporter
    (a pushd device on TLS, Connect field 33 = 1)."""
    data = nonce + exporter
    if isinstance(key, rsa.RSAPrivateKey):
        return wire.SIG_RSA_PKCS1_SHA1 + key.sign(data, padding.PKCS1v15(), hashes.SHA1())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return wire.SIG_ECDSA_SHA256 + key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise ValueError("unsupported key type")


def verify_connect(
    ca_cert: x509.Certificate,
    cert_der: bytes,
    nonce: bytes,
    signature: bytes,
    now: float,
    exporter: bytes | None = None,
) -> str:
    """
    Check a Connect's certificate, nonce and signature; return the device id.
    With ``exporter`` (a bound Connect) the signature must cover nonce || exporter,
    else the nonce alone. Raises AuthError with the reason.
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
    try:
        check_device_key(cert.public_key())
    except (KeyPolicyError, ValueError) as e:  # ValueError: a key cryptography cannot load
        raise AuthError(str(e))
    if len(nonce) != 17 or nonce[0] != 0:
        raise AuthError("nonce is not 0x00 + u64 ms + 8 random bytes")
    stamp = nonce_time(nonce)
    if abs(stamp - now) > NONCE_WINDOW:
        raise AuthError(f"stale nonce ({stamp - now:+.0f} s from server time)")
    public = cert.public_key()
    prefix, sig = signature[:2], signature[2:]
    data = nonce if exporter is None else nonce + exporter
    try:
        if prefix == wire.SIG_RSA_PKCS1_SHA1 and isinstance(public, rsa.RSAPublicKey):
            public.verify(sig, data, padding.PKCS1v15(), hashes.SHA1())
        elif prefix == wire.SIG_ECDSA_SHA256 and isinstance(
            public, ec.EllipticCurvePublicKey
        ):
            public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise AuthError("signature scheme does not match the certificate key")
    except InvalidSignature:
        if exporter is None:
            raise AuthError("bad signature over the nonce")
        raise AuthError("bad signature over the nonce and this connection's TLS exporter")
    return device_id


# --- enrolment: the device proves it knows the secret without sending it ---------


#: What an enrolment request's MAC covers first: requests of the nonce-less format never verify.
ENROL_LABEL = b"pushd-enrol-v2"


def enrol_request_parts(csr_pem: bytes, nonce: str, when: int) -> tuple:
    """What an enrolment request's MAC covers: the CSR, its one-time nonce and its time."""
    return ENROL_LABEL, csr_pem, nonce.encode("ascii"), str(when).encode("ascii")


def enrol_mac(secret: bytes, *parts: bytes) -> str:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for p in parts:
        h.update(struct.pack(">I", len(p)))
        h.update(p)
    return h.hexdigest()


# --- renewal: the device proves it holds its current certificate's key ----------


def renewal_input(csr_pem: bytes, cert_pem_: bytes, nonce: str, when: int) -> bytes:
    """What a renewal request signs: length-prefixed, so no field can run into another."""
    out = b"pushd-renew-v1"
    for p in (csr_pem, cert_pem_, nonce.encode("ascii"), str(when).encode("ascii")):
        out += struct.pack(">I", len(p)) + p
    return out


def sign_renewal(key, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise ValueError("unsupported key type")


def verify_renewal(public_key, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


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
        """TLS options for a listener; ``alpn`` must list every protocol a client may offer.
        TLS 1.2 or 1.3 only, AEAD suites only (``SERVER_CIPHERS``)."""
        from OpenSSL import crypto

        return ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.server_key),
            certificate=crypto.X509.from_cryptography(self.server_cert),
            extraCertChain=[crypto.X509.from_cryptography(self.ca_cert)],
            acceptableProtocols=alpn,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
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
