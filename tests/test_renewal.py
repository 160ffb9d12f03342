"""The device side of renewal: when it runs (Clock), and that a half-done one never loses the identity."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from pushd import tls
from pushd.device import identity as identity_mod
from pushd.device.identity import RENEWAL, EnrolError, Identity
from pushd.device.renewal import FIRST_RETRY, Renewer

from .helpers import CA_CERT, CA_KEY, OTHER_CA_CERT


def new_identity(state: Path, days=365.0, device_id=None):
    key = tls.new_key("ec")
    cert = tls.issue_device_cert(CA_KEY, CA_CERT, key.public_key(), device_id, days=days)
    return Identity.create(state, key, cert, tls.cert_pem(CA_CERT))


class HalfDoneRenewalTests(unittest.TestCase):
    def setUp(self):
        self.state = Path(self.mktemp())
        self.ident = new_identity(self.state)
        self.new_key = tls.new_key("ec")
        self.new_cert = tls.issue_device_cert(CA_KEY, CA_CERT, self.new_key.public_key(), self.ident.device_id)

    def pending(self, data: bytes):
        (self.state / RENEWAL).write_bytes(data)

    def test_crash_after_new_key_written_is_finished_on_start(self):
        self.pending(tls.key_pem(self.new_key) + tls.cert_pem(self.new_cert))
        # The crash came between replacing device.key and device.pem: they do not match now.
        tls.write_private(self.state / "device.key", tls.key_pem(self.new_key))
        loaded = Identity.load(self.state)
        self.assertEqual(loaded.cert.serial_number, self.new_cert.serial_number)
        self.assertEqual(tls.key_fingerprint(loaded.key.public_key()), tls.key_fingerprint(self.new_cert.public_key()))
        self.assertFalse((self.state / RENEWAL).exists())

    def test_torn_or_foreign_renewal_file_is_dropped_and_old_identity_kept(self):
        stranger = tls.issue_device_cert(CA_KEY, CA_CERT, self.new_key.public_key())
        for data in (
            tls.key_pem(self.new_key)[:50],                                  # torn write
            tls.key_pem(self.new_key),                                       # key, no certificate
            tls.key_pem(tls.new_key("ec")) + tls.cert_pem(self.new_cert),    # key of another certificate
            tls.key_pem(self.new_key) + tls.cert_pem(stranger),              # another device's
        ):
            self.pending(data)
            loaded = Identity.load(self.state)
            self.assertEqual(loaded.cert.serial_number, self.ident.cert.serial_number)
            self.assertEqual(loaded.device_id, self.ident.device_id)
            self.assertFalse((self.state / RENEWAL).exists())

    def test_renew_writes_both_files_and_keeps_tokens(self):
        self.ident.base_token = b"\x01" * 32
        self.ident.tokens = {"com.example.app": b"\x02" * 32}
        self.ident.save()

        def post(url, body, ctx, timeout, what):
            import json

            from cryptography import x509

            csr = x509.load_pem_x509_csr(json.loads(body)["csr"].encode())
            cert = tls.issue_device_cert(CA_KEY, CA_CERT, csr.public_key(), self.ident.device_id)
            return {"certificate": tls.cert_pem(cert).decode()}

        self.patch(identity_mod, "_post", post)
        key, cert = identity_mod.renew("https://gateway", self.ident)
        loaded = Identity.load(self.state)
        self.assertEqual(loaded.cert.serial_number, cert.serial_number)
        self.assertEqual((loaded.base_token, loaded.tokens), (b"\x01" * 32, {"com.example.app": b"\x02" * 32}))

    def test_renewal_answer_for_another_device_or_ca_refused(self):
        def post_other_device(url, body, ctx, timeout, what):
            import json

            from cryptography import x509

            csr = x509.load_pem_x509_csr(json.loads(body)["csr"].encode())
            return {"certificate": tls.cert_pem(tls.issue_device_cert(CA_KEY, CA_CERT, csr.public_key())).decode()}

        self.patch(identity_mod, "_post", post_other_device)
        with self.assertRaisesRegex(EnrolError, "not a certificate of this device"):
            identity_mod.renew("https://gateway", self.ident)
        self.patch(identity_mod, "_post", lambda *a: {"certificate": tls.cert_pem(OTHER_CA_CERT).decode()})
        with self.assertRaisesRegex(EnrolError, "no certificate of our CA"):
            identity_mod.renew("https://gateway", self.ident)
        self.assertEqual(Identity.load(self.state).cert.serial_number, self.ident.cert.serial_number)


class RenewerTests(unittest.TestCase):
    def setUp(self):
        self.ident = new_identity(Path(self.mktemp()), days=30.0)
        self.clock = task.Clock()
        self.nb = self.ident.cert.not_valid_before_utc.timestamp()
        self.life = self.ident.cert.not_valid_after_utc.timestamp() - self.nb
        self.clock.advance(self.nb + 300)
        self.factory = SimpleNamespace(private_key=self.ident.key, certificate_der=self.ident.cert_der)
        self.calls = []
        self.results = []

    def renewer(self, seed=1):
        def renew(url, ident):
            self.calls.append(self.clock.seconds())
            return self.results.pop(0)

        def in_thread(f, *a):
            try:
                return defer.succeed(f(*a))
            except Exception:
                return defer.fail(Failure())

        r = Renewer(self.ident, self.factory, "https://gateway", self.clock, rng=random.Random(seed),
                    renew=renew, in_thread=in_thread)
        r.startService()
        self.addCleanup(r.stopService)
        return r

    def test_renews_at_two_thirds_with_jitter_and_uses_new_certificate(self):
        key = tls.new_key("ec")
        cert = tls.issue_device_cert(CA_KEY, CA_CERT, key.public_key(), self.ident.device_id, days=30.0)
        self.results.append((key, cert))
        self.renewer()
        due = self.clock.getDelayedCalls()[0].getTime()
        share = (due - self.nb) / self.life
        self.assertTrue(2 / 3 - 0.05 <= share <= 2 / 3 + 0.05, share)
        self.clock.advance(due - self.clock.seconds() - 1)
        self.assertEqual(self.calls, [])
        self.clock.advance(1)
        self.assertEqual(len(self.calls), 1)
        self.assertIs(self.factory.private_key, key)
        self.assertEqual(self.factory.certificate_der, self.ident.cert_der)
        self.assertEqual(self.ident.cert.serial_number, cert.serial_number)
        # And the next renewal is planned at 2/3 of the new certificate's life.
        (nxt,) = self.clock.getDelayedCalls()
        self.assertGreater(nxt.getTime(), cert.not_valid_before_utc.timestamp() + 0.6 * self.life)

    def test_jitter_spreads_a_fleet(self):
        dues = set()
        for seed in range(20):
            r = Renewer(self.ident, self.factory, "u", self.clock, rng=random.Random(seed))
            dues.add(round(r.due()))
        self.assertGreater(len(dues), 15)

    def test_failure_retries_with_backoff(self):
        r = self.renewer()

        def fail(url, ident):
            self.calls.append(self.clock.seconds())
            raise EnrolError("gateway refused renewal: 503 RegistryUnavailable", 503)

        r._renew_call = fail
        self.clock.advance(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds())
        gaps = []
        for _ in range(4):
            (call,) = self.clock.getDelayedCalls()
            gaps.append(call.getTime() - self.clock.seconds())
            self.clock.advance(gaps[-1])
        self.assertEqual(len(self.calls), 5)
        for n, gap in enumerate(gaps):
            self.assertTrue(0.5 * FIRST_RETRY * 2 ** n <= gap <= 1.5 * FIRST_RETRY * 2 ** n, (n, gap))
        self.assertIs(self.factory.private_key, self.ident.key)
