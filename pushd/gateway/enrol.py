"""
Device enrolment: a device sends a CSR with an HMAC keyed by the enrolment secret and gets
a device certificate and the CA back, MACed the same way. The secret never crosses the wire,
so enrolling over a not-yet-trusted TLS connection reveals nothing and trusts nothing forged.
"""

from __future__ import annotations

import hmac
import json

from cryptography import x509
from twisted.logger import Logger

from pushd import tls

MAX_CSR = 16 * 1024


class Enrolment:
    """``POST /pushd/v1/enrol``, whatever HTTP version carries it (the provider Root routes here)."""

    log = Logger()

    def __init__(self, pki):
        self.pki = pki

    def answer(self, raw: bytes, overflow: bool, peer: str) -> tuple:
        """The status and JSON body for one enrolment request, whatever HTTP carried it."""
        if overflow or len(raw) > MAX_CSR:
            return _error(413, "RequestTooLarge")
        try:
            body = json.loads(raw)
            csr_pem = body["csr"].encode("ascii")
            mac = body["mac"]
            if not isinstance(mac, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error(400, "BadRequest")
        secret = self.pki.enrol_secret
        if not hmac.compare_digest(tls.enrol_mac(secret, csr_pem), mac):
            self.log.warn("enrolment with a wrong secret from {peer}", peer=peer)
            return _error(403, "BadEnrolmentSecret")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            if not csr.is_signature_valid:
                raise ValueError("CSR signature invalid")
            cert = tls.issue_device_cert(self.pki.ca_key, self.pki.ca_cert, csr.public_key())
        except ValueError as e:
            return _error(400, f"BadCSR: {e}")
        cert_pem = tls.cert_pem(cert)
        ca_pem = tls.cert_pem(self.pki.ca_cert)
        device_id = tls.device_id_of(cert)
        self.log.info("enrolled device {device}", device=device_id)
        return 200, json.dumps(
            {
                "device_id": device_id,
                "certificate": cert_pem.decode("ascii"),
                "ca": ca_pem.decode("ascii"),
                "mac": tls.enrol_mac(secret, cert_pem, ca_pem),
            }
        ).encode()


def _error(status, reason):
    return status, json.dumps({"reason": reason}).encode()
