"""
The device's identity on disk: its key, the certificate the gateway's CA issued, that CA,
and what the gateway handed out (base token, per-topic tokens). It survives restarts; the
certificate is the device id, so a device keeps its tokens across reconnects.
"""

from __future__ import annotations

import hmac
import json
import secrets
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pushd import private, tls


class EnrolError(Exception):
    def __init__(self, message, status=None, reason=None, server_time=None):
        super().__init__(message)
        #: The gateway's HTTP status when it refused, else None (unreachable, bad answer).
        self.status = status
        self.reason = reason
        #: The gateway's clock (UNIX ms) when it refused a request as stale, else None.
        self.server_time = server_time


@dataclass
class Identity:
    state_dir: Path
    key: object
    cert: x509.Certificate
    ca_pem: bytes
    base_token: bytes | None = None
    tokens: dict = field(default_factory=dict)  # topic -> token bytes
    apps: dict = field(default_factory=dict)  # topic -> {"created": float}
    unregistered: dict = field(default_factory=dict)  # topic -> token bytes, not yet told the gateway
    provisioned_now: bool = False

    @property
    def device_id(self) -> str:
        return tls.device_id_of(self.cert)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @classmethod
    def create(cls, state_dir: Path, key, cert: x509.Certificate, ca_pem: bytes):
        """Write a new identity's key, certificate and CA; the state starts empty."""
        private.ensure_dir(state_dir)
        tls.write_private(state_dir / "device.key", tls.key_pem(key))
        tls.write_private(state_dir / "device.pem", tls.cert_pem(cert))
        tls.write_private(state_dir / "ca.pem", ca_pem)
        ident = cls(state_dir, key, cert, ca_pem, provisioned_now=True)
        ident.save()
        return ident

    @classmethod
    def load(cls, state_dir: Path):
        finish_renewal(state_dir)
        paths = [state_dir / n for n in ("device.key", "device.pem", "ca.pem")]
        if not all(p.exists() for p in paths):
            return None
        private.ensure_dir(state_dir)  # 0700 and 0600, tightened (and logged) if looser
        ident = cls(
            state_dir,
            tls.load_key(paths[0].read_bytes()),
            x509.load_pem_x509_certificate(paths[1].read_bytes()),
            paths[2].read_bytes(),
        )
        state = state_dir / "state.json"
        if state.exists():
            try:
                data = json.loads(state.read_text())
            except ValueError as e:
                raise EnrolError(f"{state} is not valid JSON: {e}")
            if data.get("base_token"):
                ident.base_token = bytes.fromhex(data["base_token"])
            ident.tokens = {t: bytes.fromhex(v) for t, v in data.get("tokens", {}).items()}
            ident.apps = data.get("apps", {})
            ident.unregistered = {t: bytes.fromhex(v) for t, v in data.get("unregistered", {}).items()}
        return ident

    def save(self) -> None:
        data = {
            "device_id": self.device_id,
            "base_token": self.base_token.hex() if self.base_token else None,
            "tokens": {t: v.hex() for t, v in self.tokens.items()},
            "apps": self.apps,
            "unregistered": {t: v.hex() for t, v in self.unregistered.items()},
        }
        private.write(self.state_dir / "state.json", json.dumps(data, indent=1, sort_keys=True).encode())


def enrol(url: str, secret: bytes, state_dir: Path, key_type: str = "ec", timeout: float = 15.0) -> Identity:
    """
    Get a device certificate from the gateway at ``url`` (its provider port). Blocking: it
    runs once, before the reactor starts. The TLS is not verified (no CA yet): the request
    and the answer are authenticated by MACs keyed with the enrolment secret.
    """
    private.ensure_dir(state_dir)
    key = tls.new_key(key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pushd device")]))
        .sign(key, hashes.SHA256())
    )
    csr_pem = csr.public_bytes(serialization.Encoding.PEM)
    nonce, when = secrets.token_hex(16), int(time.time())
    body = json.dumps({
        "csr": csr_pem.decode("ascii"), "nonce": nonce, "time": when,
        "mac": tls.enrol_mac(secret, *tls.enrol_request_parts(csr_pem, nonce, when)),
    }).encode()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    answer = _post(url, body, ctx, timeout, "enrolment")
    try:
        cert_pem = answer["certificate"].encode("ascii")
        ca_pem = answer["ca"].encode("ascii")
        mac = answer["mac"]
    except (KeyError, AttributeError, TypeError):
        raise EnrolError("gateway's enrolment answer lacks certificate, ca or mac")
    if not hmac.compare_digest(tls.enrol_mac(secret, cert_pem, ca_pem), str(mac)):
        raise EnrolError("enrolment answer fails its MAC: not our gateway, or the secret differs")
    return Identity.create(state_dir, key, x509.load_pem_x509_certificate(cert_pem), ca_pem)


def _post(url: str, body: bytes, ctx, timeout: float, what: str) -> dict:
    req = urllib.request.Request(
        url.rstrip("/") + "/pushd/v1/enrol", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return json.loads(resp.read(256 * 1024))
    except urllib.error.HTTPError as e:
        server_time = None
        try:
            answer = json.loads(e.read(4096))
            reason = answer.get("reason")
            if isinstance(answer.get("server_time"), int) and not isinstance(answer["server_time"], bool):
                server_time = answer["server_time"]
        except (ValueError, AttributeError):
            reason = e.reason
        raise EnrolError(f"gateway refused {what}: {e.code} {reason}", e.code, reason, server_time)
    except (urllib.error.URLError, OSError) as e:
        raise EnrolError(f"cannot reach the gateway at {url}: {getattr(e, 'reason', e)}")
    except ValueError:
        raise EnrolError(f"gateway's {what} answer is not JSON")


# --- renewal ----------------------------------------------------------------------------
#
# Crash-safe: the new key and certificate are written together to renewal.pem (fsync'd), then
# device.key and device.pem are replaced from it, then it is removed. A start that finds
# renewal.pem finishes the switch if it holds a matching key and certificate of the same device,
# and drops it otherwise: the old identity is never lost half-way.

RENEWAL = "renewal.pem"


def _same_key(key, cert) -> bool:
    return tls.key_fingerprint(key.public_key()) == tls.key_fingerprint(cert.public_key())


def finish_renewal(state_dir: Path):
    """Complete (or drop) a renewal a previous run left half-done; the certificate now in use."""
    pending = state_dir / RENEWAL
    if not pending.exists():
        return None
    try:
        data = pending.read_bytes()
        key = tls.load_key(data)
        cert = x509.load_pem_x509_certificate(data)
        current = x509.load_pem_x509_certificate((state_dir / "device.pem").read_bytes())
        if not _same_key(key, cert) or tls.device_id_of(cert) != tls.device_id_of(current):
            raise ValueError("key and certificate do not belong together, or to this device")
    except (OSError, ValueError, tls.AuthError):
        pending.unlink()
        return None
    private.write(state_dir / "device.key", tls.key_pem(key))
    private.write(state_dir / "device.pem", tls.cert_pem(cert))
    pending.unlink()
    return cert


def new_key_like(ident: Identity):
    """A new key of the kind the device has now."""
    return tls.new_key("rsa" if not hasattr(ident.key, "curve") else "ec")


def renew(url: str, ident: Identity, timeout: float = 30.0, key=None, when: int | None = None):
    """
    A certificate for ``key`` (a new one if None) with the same device id, authenticated by the
    current one (its key signs the request). ``when`` stamps the request: the gateway's time as
    the device knows it (Renewer), else this machine's. Blocking (run in a thread). The
    gateway's TLS is verified against the CA this time. Fires with (key, cert), already on disk.
    """
    if key is None:
        key = new_key_like(ident)
    csr_pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pushd device")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    old_pem = tls.cert_pem(ident.cert)
    nonce = secrets.token_hex(16)
    when = int(time.time()) if when is None else int(when)
    signature = tls.sign_renewal(ident.key, tls.renewal_input(csr_pem, old_pem, nonce, when))
    body = json.dumps({
        "csr": csr_pem.decode("ascii"), "certificate": old_pem.decode("ascii"),
        "nonce": nonce, "time": when, "signature": signature.hex(),
    }).encode()
    ctx = ssl.create_default_context(cadata=ident.ca_pem.decode("ascii"))
    answer = _post(url, body, ctx, timeout, "renewal")
    try:
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode("ascii"))
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ident.ca_pem))
    except Exception as e:
        raise EnrolError(f"gateway's renewal answer holds no certificate of our CA: {e!r}")
    if tls.device_id_of(cert) != ident.device_id or not _same_key(key, cert):
        raise EnrolError("gateway's renewal answer is not a certificate of this device and key")
    state = ident.state_dir
    private.write(state / RENEWAL, tls.key_pem(key) + tls.cert_pem(cert))
    finish_renewal(state)
    return key, cert
