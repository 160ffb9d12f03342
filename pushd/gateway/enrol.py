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
import json
import re
import secrets
import sqlite3
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

from pushd import tls
from pushd.admission import address_key
from pushd.filewatch import FileWatch
from pushd.gateway.registry import Refusal
from pushd.gateway.replay import MemoryReplayCache, nonce_key
from pushd.store.interfaces import ReplayCacheFull, StoreUnavailable
from pushd.throttle import LogThrottle

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
        self._watch = FileWatch((self.state_dir / "enrol.secret", self.state_dir / "enrol.secret.old"), clock)
        self._secrets: list = []
        self._old_until = None
        self._reload(force=True)

    def now(self) -> float:
        return self._watch.now()

    def _reload(self, force=False):
        stamp = self._watch.changed(force)
        if stamp is None:
            return
        paths = self._watch.paths
        try:
            current = _read_bounded(paths[0]).strip()
            old = old_until = None
            if stamp[1] is not None:
                data = json.loads(_read_bounded(paths[1]))
                old, old_until = data["secret"].encode("ascii"), float(data["until"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # Said once per change of the files.
            self.log.error("keeping the previous enrolment secrets: {why}", why=repr(e))
            return
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


# --- refusals: domain errors, named like APNs reasons (the HTTP layer, rules.py, gives statuses) ---


class Refused(Exception):
    """An enrolment or renewal refused; ``reason`` is the class name, ``detail`` says more."""

    def __init__(self, detail: str | None = None, **extra):
        self.detail = detail
        self.extra = extra  # more JSON fields for the answer
        super().__init__(self.text)

    @property
    def reason(self) -> str:
        return type(self).__name__

    @property
    def text(self) -> str:
        return self.reason if self.detail is None else f"{self.reason}: {self.detail}"


class BadRequest(Refused):
    """A field missing, of the wrong type or too long."""


class BadCSR(Refused):
    pass


class BadKey(Refused):
    """The key is below the key policy (tls.check_device_key)."""


class RequestTooLarge(Refused):
    pass


class TooManyRequests(Refused):
    """The enrolment rate of this source address (admission.address_key) is used up."""


class BadEnrolmentSecret(Refused):
    pass


class StaleRequest(Refused):
    """The request's time is outside the window; ``server_time`` (ms) lets the device retry on our clock."""


class ReplayedRequest(Refused):
    pass


class TooManyEnrolments(Refused):
    """The nonce memory is full: refusing is safe, forgetting a live nonce is not."""


class NonceCacheUnavailable(Refused):
    """The shared nonce cache (Redis) did not answer: refused, never let through unchecked."""


class KeyAlreadyEnrolled(Refused):
    pass


class BadCertificate(Refused):
    pass


class CertificateExpired(Refused):
    pass


class BadSignature(Refused):
    pass


class DeviceRevoked(Refused):
    pass


class UnknownCertificate(Refused):
    pass


class CertificateReplaced(Refused):
    """A renewal already replaced this certificate: its key may renew no more (it may have leaked)."""


class RegistryUnavailable(Refused):
    pass


#: What a registry refusal means for a renewal.
_REGISTRY_REFUSALS = {
    Refusal.REVOKED: DeviceRevoked,
    Refusal.RETIRED: CertificateReplaced,
    Refusal.UNAVAILABLE: RegistryUnavailable,
}

_ADDRESS = re.compile(r"(IPv[46])Address\(type='(\w+)', host='([^']*)', port=(\d+)")


def _address(peer):
    """``peer`` as an IAddress: the HTTP layers pass its str()."""
    if isinstance(peer, (IPv4Address, IPv6Address)):
        return peer
    m = _ADDRESS.match(str(peer))
    if m is None:
        return None
    kind = IPv4Address if m.group(1) == "IPv4" else IPv6Address
    return kind(m.group(2), m.group(3), int(m.group(4)))


def _source(peer, ipv6_prefix: int):
    """(rate-limit key, host for the log): an IPv6 address counts by its prefix, as admission does."""
    addr = _address(peer)
    if addr is None:
        return str(peer), str(peer)
    key = address_key(addr, ipv6_prefix)
    return (str(peer) if key is None else key), addr.host


def _log_refusals(counts, total, sample):
    Enrolment.log.warn("refused {total} enrolment requests since the last line: {counts}"
                       " (last from {peer}: {why})",
                       total=total, counts=counts, peer=sample.get("peer"), why=sample.get("why"))


def _text(body, name, limit, pattern=None) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > limit or not value.isascii():
        raise BadRequest(f"{name} must be an ASCII string of at most {limit} characters")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise BadRequest(f"{name} must match {pattern}")
    return value


def _int(body, name) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**40:
        raise BadRequest(f"{name} must be an integer (UNIX seconds)")
    return value


class Enrolment:
    """
    ``POST /pushd/v1/enrol``, whatever HTTP version carries it: ``answer`` gives the JSON
    body of a success or raises a Refused (the provider's rules.py turns either into a response).
    """

    log = Logger()

    def __init__(self, pki, secrets=None, registry=None, clock=None, rate_limit=None,
                 window: float = 300.0, max_nonces: int = 100_000,
                 cert_days: float = tls.DEVICE_CERT_DAYS, overlap: float = 7 * 86400.0,
                 ipv6_prefix: int = 64, nonces=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.pki = pki
        self.secrets = secrets
        self.registry = registry
        self.clock = clock
        self.rate_limit = rate_limit
        self.window = window
        #: Nonces of accepted requests until their time leaves the window. Only requests that
        #: passed their MAC or signature get here, so filling it takes the secret or a device key.
        #: An IReplayCache: in a cluster the nodes' shared one (pushd.store.redis_replay), so a
        #: request replayed to another node is refused too.
        self.nonces = nonces if nonces is not None else MemoryReplayCache(max_nonces, clock)
        self.cert_days = cert_days
        self.overlap = overlap
        self.ipv6_prefix = ipv6_prefix
        self.refusals = LogThrottle(clock, _log_refusals)
        self.enrolled = 0
        self.renewed = 0
        self.refused = 0

    def answer(self, raw: bytes, overflow: bool, peer):
        """
        The JSON answer to one enrolment or renewal request, or a Deferred of it when the
        nonce cache answers later (a shared one); raises (or fails with) Refused.
        """
        key, host = _source(peer, self.ipv6_prefix)
        try:
            try:
                if self.rate_limit is not None and not self.rate_limit.allow(key):
                    raise TooManyRequests()
                if overflow or len(raw) > MAX_BODY:
                    raise RequestTooLarge()
                try:
                    body = json.loads(raw)
                except ValueError:  # UnicodeDecodeError is one
                    raise BadRequest("the body is not JSON")
                if not isinstance(body, dict):
                    raise BadRequest("the body is not a JSON object")
                out = self._renew(body, host) if "certificate" in body else self._enrol(body, host)
            except sqlite3.Error as e:
                self.log.error("device registry unavailable: {why}", why=str(e))
                raise RegistryUnavailable()
        except Refused as e:
            self._note(e, host)
            raise
        if isinstance(out, defer.Deferred):
            out.addErrback(self._failed_later, host)
        return out

    def _note(self, e: Refused, host):
        self.refused += 1
        self.refusals.note(e.reason, peer=host, why=e.text)

    def _failed_later(self, failure, host):
        """What answer() does for a refusal raised after the nonce cache answered."""
        if failure.check(sqlite3.Error):
            self.log.error("device registry unavailable: {why}", why=failure.getErrorMessage())
            e = RegistryUnavailable()
            self._note(e, host)
            raise e
        if failure.check(Refused):
            self._note(failure.value, host)
        return failure

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
            raise BadEnrolmentSecret()
        return self._fresh(nonce, when, self._enrolled, csr_pem, nonce, secret, host)

    def _enrolled(self, csr_pem, nonce, secret, host):
        public = self._csr_key(csr_pem)
        if self.registry is not None and self.registry.key_known(tls.key_fingerprint(public)):
            raise KeyAlreadyEnrolled()
        cert = self._issue(public, None, f"enrol from {host} nonce {nonce[:8]}")
        self.enrolled += 1
        self.log.info("enrolled device {device} (serial {serial:x}) from {peer}",
                      device=tls.device_id_of(cert), serial=cert.serial_number, peer=host)
        cert_pem = tls.cert_pem(cert)
        ca_pem = tls.cert_pem(self.pki.ca_cert)
        return {
            "device_id": tls.device_id_of(cert),
            "certificate": cert_pem.decode("ascii"),
            "ca": ca_pem.decode("ascii"),
            "mac": tls.enrol_mac(secret, cert_pem, ca_pem),
        }

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
            raise BadCertificate()
        now = self.clock.seconds()
        if not old.not_valid_before_utc.timestamp() <= now <= old.not_valid_after_utc.timestamp():
            raise CertificateExpired()
        old_der = old.public_bytes(serialization.Encoding.DER)
        if self.registry is not None:
            why = self.registry.check(old_der, device_id, now)
            if why is not None:
                raise _REGISTRY_REFUSALS.get(why, UnknownCertificate)()
        try:
            valid = tls.verify_renewal(old.public_key(), signature, tls.renewal_input(csr_pem, old_pem, nonce, when))
        except ValueError:
            valid = False
        if not valid:
            raise BadSignature()
        return self._fresh(nonce, when, self._renewed, csr_pem, old, old_der, device_id, now)

    def _renewed(self, csr_pem, old, old_der, device_id, now):
        public = self._csr_key(csr_pem)
        fp = tls.key_fingerprint(public)
        if self.registry is not None and self.registry.retired(old_der):
            # Replaced by a renewal, so still accepted for Connect during the overlap, but its key
            # renews no more: a leaked old key would mint fresh certificates. Only a device that
            # lost our answer asks again, with the successor's key (it keeps it for its retries):
            # that key is proven by the CSR's signature, so a new certificate for it gives nothing away.
            if not self.registry.current_key(device_id, fp):
                raise CertificateReplaced()
        elif self.registry is not None and fp != tls.key_fingerprint(old.public_key()) and self.registry.key_known(fp):
            raise KeyAlreadyEnrolled()
        cert = self._issue(public, device_id, f"renewal of {old.serial_number:x}")
        if self.registry is not None:
            # Kept a while, not cut off: the device may not have got this answer.
            self.registry.retire(tls.cert_fingerprint(old_der), now + self.overlap)
        self.renewed += 1
        self.log.info("renewed device {device}'s certificate: serial {old:x} -> {new:x}",
                      device=device_id, old=old.serial_number, new=cert.serial_number)
        return {
            "device_id": device_id,
            "certificate": tls.cert_pem(cert).decode("ascii"),
            "ca": tls.cert_pem(self.pki.ca_cert).decode("ascii"),
        }

    # --- shared steps ---------------------------------------------------------------

    def _fresh(self, nonce, when, then, *args):
        """
        ``then(*args)`` once the nonce is known to be new (and now remembered): at once with
        a cache that answers at once (memory), else a Deferred of it (Redis, in a cluster).
        """
        now = self.clock.seconds()
        if abs(when - now) > self.window:
            # Our time, so that a device with a skewed clock can stamp its next try right.
            raise StaleRequest(server_time=int(now * 1000))
        # Remembered while its time is inside the window: until then it would be accepted.
        d = self.nonces.seen(nonce_key("enrol", nonce.encode("ascii")), when + self.window)
        if d.called:
            answered = []
            d.addBoth(answered.append)
            self._new_nonce(answered[0])
            return then(*args)
        return d.addBoth(self._new_nonce).addCallback(lambda _: then(*args))

    @staticmethod
    def _new_nonce(result):
        if result is True:
            raise ReplayedRequest()
        if result is False:
            return None
        if result.check(ReplayCacheFull):
            raise TooManyEnrolments()
        if result.check(StoreUnavailable):
            # Fail closed: a nonce that cannot be checked could be a replay.
            raise NonceCacheUnavailable(result.getErrorMessage())
        return result

    @staticmethod
    def _csr_key(csr_pem):
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            if not csr.is_signature_valid:
                raise ValueError("CSR signature invalid")
            public = csr.public_key()
        except (ValueError, TypeError) as e:
            raise BadCSR(str(e))
        try:
            tls.check_device_key(public)
        except tls.KeyPolicyError as e:
            raise BadKey(str(e))
        return public

    def _issue(self, public, device_id, via):
        cert = tls.issue_device_cert(self.pki.ca_key, self.pki.ca_cert, public, device_id, days=self.cert_days)
        if self.registry is not None:
            # Recorded (fsync'd) before the device has it: no certificate out there is unknown.
            try:
                self.registry.record_cert(cert, via, issued_at=self.clock.seconds())
            except sqlite3.Error as e:
                self.log.error("device registry unwritable: {why}", why=str(e))
                raise RegistryUnavailable()
        return cert
