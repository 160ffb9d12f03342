"""
Device enrolment and renewal, ``POST /pushd/v1/enrol``.

Enrolment: a device sends a CSR, a one-time nonce and its clock, with an HMAC keyed by the
enrolment secret, and gets a device certificate and the CA back, MACed the same way. The secret
never crosses the wire, so enrolling over a not-yet-trusted TLS connection reveals nothing and
trusts nothing forged. A replay is refused twice over: by its nonce (remembered while its time is
inside the window) and by its key (one public key, one enrolment: the registry persists it).

Renewal: the same path, authenticated by the device's current certificate instead of the secret:
it sends that certificate and a new CSR, signed with the certificate's key. The new certificate
keeps the device id, so its tokens stay the same.
"""

from __future__ import annotations

import hmac
import sqlite3
import json
import re
import secrets
import time
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger

from pushd import tls

MAX_CSR = 16 * 1024
MAX_SIGNATURE = 1024  # bytes: an RSA-4096 signature is 512
#: The largest request body, a renewal at its fields' limits: certificate and CSR (PEM, whose
#: newline every 64 characters JSON writes as two), the signature in hex, nonce, time, MAC and
#: JSON's keys. The provider API keeps an enrolment body up to this (rules.ENROL_LIMIT): 35,840
#: bytes, within HTTP/2's initial window, which is all a connection without a token gets.
MAX_BODY = 2 * (MAX_CSR + MAX_CSR // 64) + 2 * MAX_SIGNATURE + 512


class EnrolSecrets:
    """
    The enrolment secrets accepted now: ``enrol.secret``, and during a rotation's grace
    ``enrol.secret.old`` (JSON ``{"secret", "until"}``, written by ``pushctl enrol-secret
    rotate --grace``). Re-read when they change, looked at no more than once a second.
    """

    log = Logger()

    def __init__(self, state_dir: Path, clock=None):
        self.state_dir = Path(state_dir)
        self._clock = clock
        self._checked = None
        self._stamp = None
        self._secrets: list = []
        self._old_until = None
        self._reload(force=True)

    def now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _reload(self, force=False):
        now = self.now()
        if not force and self._checked is not None and now - self._checked < 1.0:
            return
        self._checked = now
        paths = (self.state_dir / "enrol.secret", self.state_dir / "enrol.secret.old")
        stamp = tuple(p.stat().st_mtime_ns if p.exists() else None for p in paths)
        if stamp == self._stamp:
            return
        try:
            current = _read_bounded(paths[0]).strip()
            old = old_until = None
            if stamp[1] is not None:
                data = json.loads(_read_bounded(paths[1]))
                old, old_until = data["secret"].encode("ascii"), float(data["until"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.log.error("keeping the previous enrolment secrets: {why}", why=repr(e))
            return
        self._stamp = stamp
        self._secrets = [current] if current else []
        if old:
            self._secrets.append(old)
        self._old_until = old_until

    def accepted(self) -> list:
        self._reload()
        if self._old_until is not None and self.now() > self._old_until:
            return self._secrets[:1]
        return list(self._secrets)


def _read_bounded(path: Path, limit: int = 4096) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is over {limit} bytes")
    return data


def rotate_secret(state_dir: Path, grace: float, now: float) -> bytes:
    """
    A new enrolment secret; the old one stays accepted ``grace`` seconds (0: not at all).
    The old file is written first, so a crash in between leaves the old secret accepted, never none.
    """
    state_dir = Path(state_dir)
    current = (state_dir / "enrol.secret").read_bytes().strip()
    old_path = state_dir / "enrol.secret.old"
    if grace > 0 and current:
        tls.write_private(old_path, json.dumps({"secret": current.decode("ascii"), "until": now + grace}).encode())
    elif old_path.exists():
        old_path.unlink()
    new = secrets.token_hex(24).encode("ascii")
    tls.write_private(state_dir / "enrol.secret", new + b"\n")
    return new


class SeenNonces:
    """
    Nonces of accepted requests, each kept until its request's time has left the window (at most
    2 x window after it arrived). Only requests that passed their MAC or signature get here, so
    filling it takes the secret; when full, requests are refused rather than a nonce forgotten.
    """

    def __init__(self, window: float, max_entries: int, clock):
        self.window = window
        self.max_entries = max_entries
        self.clock = clock
        self._seen: OrderedDict = OrderedDict()  # nonce -> forget at; in arrival order

    def add(self, nonce: str) -> str | None:
        """None if new (now remembered); else "replay" or "full"."""
        now = self.clock.seconds()
        seen = self._seen
        while seen:
            first = next(iter(seen))
            if seen[first] > now:
                break
            del seen[first]
        if nonce in seen:
            return "replay"
        if len(seen) >= self.max_entries:
            return "full"
        seen[nonce] = now + 2 * self.window
        return None

    def __len__(self):
        return len(self._seen)


class _Throttled:
    """A warning at most once a second, with how many were not logged: hostile input is normal."""

    def __init__(self, log, clock):
        self.log = log
        self.clock = clock
        self._last = None
        self._skipped = 0

    def warn(self, fmt, **kw):
        now = self.clock.seconds()
        if self._last is not None and now - self._last < 1.0:
            self._skipped += 1
            return
        self._last = now
        self.log.warn(fmt + " ({skipped} similar not logged)", skipped=self._skipped, **kw)
        self._skipped = 0


class BadRequest(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _host(peer) -> str:
    """The address of ``peer`` (an IAddress or its str()), without the port: the rate-limit key."""
    host = getattr(peer, "host", None)
    if host is not None:
        return host
    m = re.search(r"host='([^']*)'", str(peer))
    return m.group(1) if m else str(peer)


def _text(body, name, limit, pattern=None) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > limit or not value.isascii():
        raise BadRequest(400, f"BadRequest: {name} must be an ASCII string of at most {limit} characters")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise BadRequest(400, f"BadRequest: {name} must match {pattern}")
    return value


def _int(body, name) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**40:
        raise BadRequest(400, f"BadRequest: {name} must be an integer (UNIX seconds)")
    return value


class Enrolment:
    """``POST /pushd/v1/enrol``, whatever HTTP version carries it (the provider Root routes here)."""

    log = Logger()

    def __init__(self, pki, secrets=None, registry=None, clock=None, rate_limit=None,
                 window: float = 300.0, max_nonces: int = 100_000,
                 cert_days: float = tls.DEVICE_CERT_DAYS, overlap: float = 7 * 86400.0):
        if clock is None:
            from twisted.internet import reactor as clock
        self.pki = pki
        self.secrets = secrets
        self.registry = registry
        self.clock = clock
        self.rate_limit = rate_limit
        self.window = window
        self.nonces = SeenNonces(window, max_nonces, clock)
        self.cert_days = cert_days
        self.overlap = overlap
        self._refusals = _Throttled(self.log, clock)
        self.enrolled = 0
        self.renewed = 0
        self.refused = 0

    def answer(self, raw: bytes, overflow: bool, peer) -> tuple:
        """The status and JSON body for one enrolment or renewal request, whatever HTTP carried it."""
        host = _host(peer)
        try:
            if self.rate_limit is not None and not self.rate_limit.allow(host):
                raise BadRequest(429, "TooManyRequests")
            if overflow or len(raw) > MAX_BODY:
                raise BadRequest(413, "RequestTooLarge")
            try:
                body = json.loads(raw)
            except ValueError:  # UnicodeDecodeError is one
                raise BadRequest(400, "BadRequest: the body is not JSON")
            if not isinstance(body, dict):
                raise BadRequest(400, "BadRequest: the body is not a JSON object")
            if "certificate" in body:
                return self._renew(body, host)
            return self._enrol(body, host)
        except sqlite3.Error as e:
            self.log.error("device registry unavailable: {why}", why=str(e))
            return _error(503, "RegistryUnavailable")
        except BadRequest as e:
            self.refused += 1
            self._refusals.warn("enrolment from {peer} refused: {status} {reason}",
                                peer=host, status=e.status, reason=e.reason)
            return _error(e.status, e.reason)

    # --- the two kinds of request ---------------------------------------------------

    def _enrol(self, body, host):
        csr_pem = _text(body, "csr", MAX_CSR).encode("ascii")
        nonce = _text(body, "nonce", 32, r"[0-9a-f]{32}")
        when = _int(body, "time")
        mac = _text(body, "mac", 64, r"[0-9a-f]{64}")
        accepted = self.secrets.accepted() if self.secrets is not None else [self.pki.enrol_secret]
        signed = tls.enrol_request_parts(csr_pem, nonce, when)
        secret = next((s for s in accepted if hmac.compare_digest(tls.enrol_mac(s, *signed), mac)), None)
        if secret is None:
            raise BadRequest(403, "BadEnrolmentSecret")
        self._fresh(nonce, when)
        public = self._csr_key(csr_pem)
        if self.registry is not None and self.registry.key_known(tls.key_fingerprint(public)):
            raise BadRequest(409, "KeyAlreadyEnrolled")
        cert = self._issue(public, None, f"enrol from {host} nonce {nonce[:8]}")
        self.enrolled += 1
        self.log.info("enrolled device {device} (serial {serial:x}) from {peer}",
                      device=tls.device_id_of(cert), serial=cert.serial_number, peer=host)
        cert_pem = tls.cert_pem(cert)
        ca_pem = tls.cert_pem(self.pki.ca_cert)
        return 200, json.dumps({
            "device_id": tls.device_id_of(cert),
            "certificate": cert_pem.decode("ascii"),
            "ca": ca_pem.decode("ascii"),
            "mac": tls.enrol_mac(secret, cert_pem, ca_pem),
        }).encode()

    def _renew(self, body, host):
        csr_pem = _text(body, "csr", MAX_CSR).encode("ascii")
        old_pem = _text(body, "certificate", MAX_CSR).encode("ascii")
        nonce = _text(body, "nonce", 32, r"[0-9a-f]{32}")
        when = _int(body, "time")
        signature = bytes.fromhex(_text(body, "signature", 2 * MAX_SIGNATURE, r"(?:[0-9a-f]{2})+"))
        try:
            old = x509.load_pem_x509_certificate(old_pem)
            old.verify_directly_issued_by(self.pki.ca_cert)
            device_id = tls.device_id_of(old)
        except (ValueError, TypeError, InvalidSignature, tls.AuthError):
            raise BadRequest(403, "BadCertificate")
        now = self.clock.seconds()
        if not old.not_valid_before_utc.timestamp() <= now <= old.not_valid_after_utc.timestamp():
            raise BadRequest(403, "CertificateExpired")
        old_der = old.public_bytes(serialization.Encoding.DER)
        if self.registry is not None:
            why = self.registry.check(old_der, device_id, now)
            if why is not None:
                raise BadRequest(403, "DeviceRevoked" if "revoked" in why else "UnknownCertificate")
        try:
            valid = tls.verify_renewal(old.public_key(), signature, tls.renewal_input(csr_pem, old_pem, nonce, when))
        except ValueError:
            valid = False
        if not valid:
            raise BadRequest(403, "BadSignature")
        self._fresh(nonce, when)
        public = self._csr_key(csr_pem)
        fp = tls.key_fingerprint(public)
        if self.registry is not None and fp != tls.key_fingerprint(old.public_key()) and self.registry.key_known(fp):
            raise BadRequest(409, "KeyAlreadyEnrolled")
        cert = self._issue(public, device_id, f"renewal of {old.serial_number:x}")
        if self.registry is not None:
            # Kept a while, not cut off: the device may not have got this answer.
            self.registry.retire(tls.cert_fingerprint(old_der), now + self.overlap)
        self.renewed += 1
        self.log.info("renewed device {device}'s certificate: serial {old:x} -> {new:x}",
                      device=device_id, old=old.serial_number, new=cert.serial_number)
        return 200, json.dumps({
            "device_id": device_id,
            "certificate": tls.cert_pem(cert).decode("ascii"),
            "ca": tls.cert_pem(self.pki.ca_cert).decode("ascii"),
        }).encode()

    # --- shared steps ---------------------------------------------------------------

    def _fresh(self, nonce, when):
        if abs(when - self.clock.seconds()) > self.window:
            raise BadRequest(403, "StaleRequest")
        seen = self.nonces.add(nonce)
        if seen == "replay":
            raise BadRequest(409, "ReplayedRequest")
        if seen == "full":
            raise BadRequest(503, "TooManyEnrolments")

    @staticmethod
    def _csr_key(csr_pem):
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            if not csr.is_signature_valid:
                raise ValueError("CSR signature invalid")
            public = csr.public_key()
        except (ValueError, TypeError) as e:
            raise BadRequest(400, f"BadCSR: {e}")
        try:
            tls.check_device_key(public)
        except tls.KeyPolicyError as e:
            raise BadRequest(400, f"BadKey: {e}")
        return public

    def _issue(self, public, device_id, via):
        cert = tls.issue_device_cert(self.pki.ca_key, self.pki.ca_cert, public, device_id, days=self.cert_days)
        if self.registry is not None:
            # Recorded (fsync'd) before the device has it: no certificate out there is unknown.
            try:
                self.registry.record_cert(cert, via, issued_at=self.clock.seconds())
            except sqlite3.Error as e:
                self.log.error("device registry unwritable: {why}", why=str(e))
                raise BadRequest(503, "RegistryUnavailable")
        return cert


def _error(status, reason):
    return status, json.dumps({"reason": reason}).encode()
