"""Enrolment and renewal as one object, driven by a Clock: replay, rate limit, key policy, rotation, types."""

from __future__ import annotations

import json
import os
import secrets
import stat
import warnings
from pathlib import Path
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import task
from twisted.trial import unittest

from pushd import tls
from pushd.gateway.enrol import Enrolment, EnrolSecrets, rotate_secret
from pushd.gateway.provider.rules import enrol_answer
from pushd.gateway.ratelimit import Buckets
from pushd.gateway.registry import DeviceRegistry, Refusal

from .helpers import CA_CERT, CA_KEY, T0

PEER = "IPv4Address(type='TCP', host='192.0.2.7', port=40000)"


def csr_of(key) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pushd device")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def enrol_body(secret, key=None, nonce=None, when=T0, **over) -> bytes:
    csr_pem = csr_of(key or tls.new_key("ec"))
    nonce = nonce or secrets.token_hex(16)
    body = {"csr": csr_pem.decode(), "nonce": nonce, "time": int(when),
            "mac": tls.enrol_mac(secret, *tls.enrol_request_parts(csr_pem, nonce, int(when)))}
    body.update(over)
    return json.dumps(body).encode()


def renew_body(old_key, old_cert, new_key=None, nonce=None, when=T0, signer=None) -> bytes:
    csr_pem = csr_of(new_key or tls.new_key("ec"))
    old_pem = tls.cert_pem(old_cert)
    nonce = nonce or secrets.token_hex(16)
    sig = tls.sign_renewal(signer or old_key, tls.renewal_input(csr_pem, old_pem, nonce, int(when)))
    return json.dumps({"csr": csr_pem.decode(), "certificate": old_pem.decode(), "nonce": nonce,
                       "time": int(when), "signature": sig.hex()}).encode()


def rsa_key(bits):
    """RSA keys below 1024 bits: cryptography will not make them, OpenSSL still does (an attacker's would)."""
    if bits >= 1024:
        return rsa.generate_private_key(65537, bits)
    from OpenSSL import crypto

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        k = crypto.PKey()
        k.generate_key(crypto.TYPE_RSA, bits)
    return k.to_cryptography_key()


class Fixture:
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.state = Path(self.mktemp())
        self.state.mkdir()
        tls.secret_file(self.state / "enrol.secret")
        self.secrets = EnrolSecrets(self.state, self.clock)
        self.secret = self.secrets.accepted()[0]
        self.registry = DeviceRegistry(self.state / "devices.sqlite3")
        self.addCleanup(self.registry.close)
        self.pki = SimpleNamespace(ca_key=CA_KEY, ca_cert=CA_CERT, enrol_secret=self.secret)
        self.enrolment = self.make()

    def make(self, **kw):
        kw.setdefault("rate_limit", Buckets(1.0, 20.0, self.clock))
        return Enrolment(self.pki, self.secrets, self.registry, self.clock, **kw)

    def ask(self, body, peer=PEER, enrolment=None, overflow=False):
        status, _, out = enrol_answer(enrolment or self.enrolment, body, overflow, peer)
        return status, json.loads(out)


class EnrolmentTests(Fixture, unittest.TestCase):
    def test_enrols_and_records_one_year_certificate(self):
        status, out = self.ask(enrol_body(self.secret))
        self.assertEqual(status, 200, out)
        cert = x509.load_pem_x509_certificate(out["certificate"].encode())
        self.assertEqual(tls.device_id_of(cert), out["device_id"])
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertLess(abs(life.total_seconds() - 365 * 86400 - tls.BACKDATE), 5)
        (row,) = self.registry.certificates()
        self.assertEqual((row["device_id"], row["serial"]), (out["device_id"], f"{cert.serial_number:x}"))
        self.assertIn("enrol from 192.0.2.7", row["via"])
        self.assertEqual(stat.S_IMODE(os.stat(self.state / "devices.sqlite3").st_mode), 0o600)

    def test_replayed_request_refused(self):
        body = enrol_body(self.secret)
        self.assertEqual(self.ask(body)[0], 200)
        for _ in range(3):
            self.assertEqual(self.ask(body), (409, {"reason": "ReplayedRequest"}))
        self.assertEqual(len(self.registry.certificates()), 1)

    def test_replay_after_restart_refused_by_key(self):
        """The nonces are in memory; the registry remembers the key across a restart."""
        body = enrol_body(self.secret)
        self.assertEqual(self.ask(body)[0], 200)
        restarted = self.make()
        self.assertEqual(self.ask(body, enrolment=restarted), (409, {"reason": "KeyAlreadyEnrolled"}))

    def test_stale_or_future_time_refused(self):
        # The answer carries the gateway's time (ms), for the device's next try.
        stale = (403, {"reason": "StaleRequest", "server_time": int(T0 * 1000)})
        self.assertEqual(self.ask(enrol_body(self.secret, when=T0 - 301)), stale)
        self.assertEqual(self.ask(enrol_body(self.secret, when=T0 + 301)), stale)
        self.assertEqual(self.ask(enrol_body(self.secret, when=T0 - 299))[0], 200)

    def test_nonce_memory_is_bounded_and_refuses_when_full(self):
        e = self.make(max_nonces=3, rate_limit=None)
        for _ in range(3):
            self.assertEqual(self.ask(enrol_body(self.secret), enrolment=e)[0], 200)
        self.assertEqual(self.ask(enrol_body(self.secret), enrolment=e), (503, {"reason": "TooManyEnrolments"}))
        self.clock.advance(601)  # 2 x window: their times are out of the window, so forgotten
        self.assertEqual(self.ask(enrol_body(self.secret, when=self.clock.seconds()), enrolment=e)[0], 200)
        self.assertEqual(len(e.nonces), 1)

    def test_nonce_remembered_while_its_time_is_in_the_window(self):
        """A request dated ahead is remembered until its own time leaves the window, not just 300 s."""
        e = self.make(rate_limit=None)
        nonce = secrets.token_hex(16)
        body = enrol_body(self.secret, nonce=nonce, when=T0 + 299)
        self.assertEqual(self.ask(body, enrolment=e)[0], 200)
        self.clock.advance(598)  # its time is still inside the window: a replay
        self.assertEqual(self.ask(body, enrolment=e), (409, {"reason": "ReplayedRequest"}))
        self.clock.advance(1)
        self.assertEqual(self.ask(body, enrolment=e), (409, {"reason": "ReplayedRequest"}))
        self.clock.advance(1)  # stale now, and forgotten
        self.assertEqual(self.ask(body, enrolment=e)[1]["reason"], "StaleRequest")
        self.assertEqual(self.ask(enrol_body(self.secret, when=self.clock.seconds()), enrolment=e)[0], 200)
        self.assertEqual(len(e.nonces), 1)

    def test_rate_limited_per_address(self):
        bad = enrol_body(b"wrong")
        statuses = [self.ask(bad)[0] for _ in range(25)]
        self.assertEqual(statuses, [403] * 20 + [429] * 5)
        # Another address is not held back by this one.
        self.assertEqual(self.ask(bad, peer="IPv4Address(type='TCP', host='192.0.2.8', port=1)")[0], 403)
        # The same address from another port is the same address.
        self.assertEqual(self.ask(bad, peer="IPv4Address(type='TCP', host='192.0.2.7', port=2)")[0], 429)
        self.clock.advance(1.0)
        self.assertEqual(self.ask(enrol_body(self.secret, when=self.clock.seconds()))[0], 200)
        self.assertEqual(self.ask(bad)[0], 429)

    def test_rate_limited_per_ipv6_prefix(self):
        """IPv6 sources count by prefix (admission.address_key, --ipv6-prefix): a /64 is one subscriber."""
        e = self.make(rate_limit=Buckets(1.0, 2.0, self.clock))
        bad = enrol_body(b"wrong")
        one = "IPv6Address(type='TCP', host='2001:db8:0:1::{n:x}', port=40000, flowInfo=0, scopeID=0)"
        statuses = [self.ask(bad, peer=one.format(n=n), enrolment=e)[0] for n in range(1, 5)]
        self.assertEqual(statuses, [403, 403, 429, 429])
        other = "IPv6Address(type='TCP', host='2001:db8:0:2::1', port=40000, flowInfo=0, scopeID=0)"
        self.assertEqual(self.ask(bad, peer=other, enrolment=e)[0], 403)
        # An IPv4-mapped address is its IPv4 address.
        v4 = "IPv4Address(type='TCP', host='192.0.2.9', port=1)"
        mapped = "IPv6Address(type='TCP', host='::ffff:192.0.2.9', port=2, flowInfo=0, scopeID=0)"
        self.assertEqual([self.ask(bad, peer=p, enrolment=e)[0] for p in (v4, v4, mapped)], [403, 403, 429])

    def test_refusals_logged_at_most_once_a_second_with_counts(self):
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        e = self.make(rate_limit=None)
        for _ in range(50):
            self.ask(enrol_body(b"wrong"), enrolment=e)
        lines = [x for x in events if "enrolment requests since the last line" in x.get("log_format", "")]
        self.assertEqual([x["total"] for x in lines], [1])
        self.clock.advance(1.0)
        lines = [x for x in events if "enrolment requests since the last line" in x.get("log_format", "")]
        self.assertEqual([x["total"] for x in lines], [1, 49])
        self.assertEqual(lines[1]["counts"], {"BadEnrolmentSecret": 49})
        self.assertEqual(lines[1]["peer"], "192.0.2.7")

    def test_key_policy(self):
        for key, ok in [
            (rsa_key(512), False),
            (rsa_key(1024), False),
            (ec.generate_private_key(ec.SECP256K1()), False),
            (ec.generate_private_key(ec.SECP521R1()), False),
            (ec.generate_private_key(ec.SECP256R1()), True),
            (ec.generate_private_key(ec.SECP384R1()), True),
            (rsa_key(2048), True),
        ]:
            status, out = self.ask(enrol_body(self.secret, key=key))
            name = getattr(key, "curve", None) and key.curve.name or f"RSA-{key.key_size}"
            if ok:
                self.assertEqual(status, 200, (name, out))
            else:
                self.assertEqual(status, 400, name)
                self.assertRegex(out["reason"], r"^BadKey: .*refused: device keys must be")

    def test_weak_key_refused_when_issuing_and_connecting(self):
        with self.assertRaisesRegex(tls.KeyPolicyError, "RSA key of 1024 bits refused"):
            tls.issue_device_cert(CA_KEY, CA_CERT, rsa_key(1024).public_key())
        # A certificate made before the policy (built by hand here) does not Connect either.
        key = rsa_key(512)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ab" * 16)])
        cert = tls._builder(subject, CA_CERT.subject, key.public_key(), 1).sign(CA_KEY, hashes.SHA256())
        nonce = tls.make_nonce(T0)
        with self.assertRaisesRegex(tls.AuthError, "RSA key of 512 bits refused"):
            tls.verify_connect(CA_CERT, cert.public_bytes(serialization.Encoding.DER), nonce,
                               tls.sign_nonce(key, nonce), T0)

    def test_bad_types_are_400_with_a_reason(self):
        good = json.loads(enrol_body(self.secret))
        cases = {
            "non-ASCII mac": dict(good, mac="é" * 64),
            "mac a list": dict(good, mac=["x"]),
            "mac an int": dict(good, mac=5),
            "csr an int": dict(good, csr=5),
            "non-ASCII csr": dict(good, csr="é"),
            "time a string": dict(good, time="1"),
            "time a bool": dict(good, time=True),
            "time a float": dict(good, time=1.5),
            "nonce missing": {k: v for k, v in good.items() if k != "nonce"},
            "nonce too short": dict(good, nonce="ab"),
            "signature non-hex": dict(good, certificate="x", signature="zz"),
            "certificate an int": dict(good, certificate=5),
        }
        for name, body in cases.items():
            status, out = self.ask(json.dumps(body).encode(), enrolment=self.make(rate_limit=None))
            self.assertEqual(status, 400, (name, out))
            self.assertTrue(out["reason"].startswith("BadRequest: "), (name, out))
        for raw in (b"\xff\xfe", b"[1]", b'"x"', b"null", b"{"):
            status, out = self.ask(raw)
            self.assertEqual(status, 400, raw)
            self.assertTrue(out["reason"].startswith("BadRequest: "))
        self.assertEqual(self.ask(b"x", overflow=True), (413, {"reason": "RequestTooLarge"}))

    def test_old_format_without_nonce_refused(self):
        csr_pem = csr_of(tls.new_key("ec"))
        body = json.dumps({"csr": csr_pem.decode(), "mac": tls.enrol_mac(self.secret, csr_pem)}).encode()
        status, out = self.ask(body)
        self.assertEqual(status, 400)
        self.assertIn("nonce", out["reason"])


class RotationTests(Fixture, unittest.TestCase):
    def test_rotation_without_grace_refuses_old_secrets_at_once(self):
        first = self.secret
        second = rotate_secret(self.state, 600, self.clock.seconds())  # first kept for a grace...
        self.clock.advance(1.0)  # the files are looked at once a second
        self.assertEqual(self.ask(enrol_body(first, when=self.clock.seconds()))[0], 200)
        third = rotate_secret(self.state, 0, self.clock.seconds())  # ...cut short by a rotation without
        self.clock.advance(1.0)
        t = self.clock.seconds()
        self.assertEqual(self.ask(enrol_body(first, when=t)), (403, {"reason": "BadEnrolmentSecret"}))
        self.assertEqual(self.ask(enrol_body(second, when=t)), (403, {"reason": "BadEnrolmentSecret"}))
        self.assertEqual(self.ask(enrol_body(third, when=t))[0], 200)
        self.assertFalse((self.state / "enrol.secret.old").exists())

    def test_rotation_with_grace_accepts_old_secret_until_it_ends(self):
        old = self.secret
        new = rotate_secret(self.state, 600, self.clock.seconds())
        self.assertEqual(stat.S_IMODE(os.stat(self.state / "enrol.secret.old").st_mode), 0o600)
        self.clock.advance(1.0)
        t = self.clock.seconds()
        status, out = self.ask(enrol_body(old, when=t))
        self.assertEqual(status, 200)
        # The answer is MACed with the secret the device used.
        self.assertEqual(out["mac"], tls.enrol_mac(old, out["certificate"].encode(), out["ca"].encode()))
        self.assertEqual(self.ask(enrol_body(new, when=t))[0], 200)
        self.clock.advance(600)
        t = self.clock.seconds()
        self.assertEqual(self.ask(enrol_body(old, when=t)), (403, {"reason": "BadEnrolmentSecret"}))
        self.assertEqual(self.ask(enrol_body(new, when=t))[0], 200)

    def test_pushctl_rotate(self):
        from pushd import ctl

        import io
        from contextlib import redirect_stdout

        old = self.secret
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(ctl.main(["enrol-secret", "rotate", "-d", str(self.state), "--grace", "60"]), 0)
        self.assertIn("the old one is accepted for 60 s more", out.getvalue())
        new = (self.state / "enrol.secret").read_bytes().strip()
        self.assertNotEqual(new, old)
        self.assertEqual(json.loads((self.state / "enrol.secret.old").read_text())["secret"], old.decode())
        with redirect_stdout(out):
            self.assertEqual(ctl.main(["enrol-secret", "rotate", "-d", str(self.state)]), 0)
        self.assertIn("the old one is no longer accepted", out.getvalue())
        self.assertFalse((self.state / "enrol.secret.old").exists())


class RenewalTests(Fixture, unittest.TestCase):
    def enrolled(self):
        key = tls.new_key("ec")
        status, out = self.ask(enrol_body(self.secret, key=key))
        self.assertEqual(status, 200, out)
        return key, x509.load_pem_x509_certificate(out["certificate"].encode())

    def test_renewal_keeps_device_id_and_retires_old_certificate_later(self):
        key, cert = self.enrolled()
        new_key = tls.new_key("ec")
        status, out = self.ask(renew_body(key, cert, new_key))
        self.assertEqual(status, 200, out)
        new = x509.load_pem_x509_certificate(out["certificate"].encode())
        self.assertEqual(tls.device_id_of(new), tls.device_id_of(cert))
        self.assertEqual(tls.key_fingerprint(new.public_key()), tls.key_fingerprint(new_key.public_key()))
        rows = self.registry.certificates()
        self.assertEqual(len(rows), 2)
        self.assertIn(f"renewal of {cert.serial_number:x}", [r["via"] for r in rows])
        old_der = cert.public_bytes(serialization.Encoding.DER)
        new_der = new.public_bytes(serialization.Encoding.DER)
        device = tls.device_id_of(cert)
        now = self.clock.seconds()
        self.assertIsNone(self.registry.check(old_der, device, now))
        self.assertEqual(self.registry.check(old_der, device, now + 7 * 86400 + 1), "certificate replaced by a renewal")
        self.assertIsNone(self.registry.check(new_der, device, now + 7 * 86400 + 1))

    def test_retired_certificate_cannot_renew_again(self):
        """Review item 5: a leaked old key must not mint certificates during the overlap."""
        key, cert = self.enrolled()
        successor_key = tls.new_key("ec")
        self.assertEqual(self.ask(renew_body(key, cert, successor_key))[0], 200)
        # The old certificate still Connects for the overlap...
        old_der = cert.public_bytes(serialization.Encoding.DER)
        self.assertIsNone(self.registry.check(old_der, tls.device_id_of(cert), self.clock.seconds()))
        # ...but its key renews no more, neither to a new key nor to itself.
        for new_key in (tls.new_key("ec"), key):
            self.assertEqual(self.ask(renew_body(key, cert, new_key)), (403, {"reason": "CertificateReplaced"}))
        self.assertEqual(len(self.registry.certificates()), 2)

    def test_device_that_lost_the_renewal_answer_gets_its_successor_key_certified(self):
        """Only with the successor's key (proven by the CSR's signature): the device keeps it for its retries."""
        key, cert = self.enrolled()
        successor_key = tls.new_key("ec")
        self.assertEqual(self.ask(renew_body(key, cert, successor_key))[0], 200)  # the answer is lost
        status, out = self.ask(renew_body(key, cert, successor_key))
        self.assertEqual(status, 200, out)
        again = x509.load_pem_x509_certificate(out["certificate"].encode())
        self.assertEqual(tls.key_fingerprint(again.public_key()), tls.key_fingerprint(successor_key.public_key()))
        self.assertEqual(tls.device_id_of(again), tls.device_id_of(cert))

    def test_renewal_needs_the_certificate_key(self):
        key, cert = self.enrolled()
        status, out = self.ask(renew_body(key, cert, signer=tls.new_key("ec")))
        self.assertEqual((status, out), (403, {"reason": "BadSignature"}))

    def test_renewal_of_revoked_or_unregistered_or_foreign_certificate_refused(self):
        key, cert = self.enrolled()
        stranger = tls.new_key("ec")
        unregistered = tls.issue_device_cert(CA_KEY, CA_CERT, stranger.public_key())
        self.assertEqual(self.ask(renew_body(stranger, unregistered)), (403, {"reason": "UnknownCertificate"}))
        from .helpers import OTHER_CA_CERT, OTHER_CA_KEY

        foreign = tls.issue_device_cert(OTHER_CA_KEY, OTHER_CA_CERT, stranger.public_key())
        self.assertEqual(self.ask(renew_body(stranger, foreign)), (403, {"reason": "BadCertificate"}))
        self.registry.revoke(tls.device_id_of(cert), self.clock.seconds())
        self.assertEqual(self.ask(renew_body(key, cert)), (403, {"reason": "DeviceRevoked"}))
        self.assertEqual(self.registry.check(cert.public_bytes(serialization.Encoding.DER), tls.device_id_of(cert),
                                             self.clock.seconds()), Refusal.REVOKED)

    def test_renewal_replay_and_expired_certificate_refused(self):
        key, cert = self.enrolled()
        body = renew_body(key, cert)
        self.assertEqual(self.ask(body)[0], 200)
        self.assertEqual(self.ask(body), (409, {"reason": "ReplayedRequest"}))
        self.clock.advance(366 * 86400)
        t = self.clock.seconds()
        self.assertEqual(self.ask(renew_body(key, cert, when=t)), (403, {"reason": "CertificateExpired"}))

    def test_renewal_key_policy(self):
        key, cert = self.enrolled()
        status, out = self.ask(renew_body(key, cert, new_key=rsa_key(1024)))
        self.assertEqual(status, 400)
        self.assertRegex(out["reason"], "^BadKey: RSA key of 1024 bits refused")
