"""The device side of renewal: when it runs (Clock), and that a half-done one never loses the identity."""

from __future__ import annotations

import io
import json
import os
import random
import stat
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from pushd import private, tls
from pushd.gateway.enrol import Enrolment
from pushd.gateway.provider.rules import enrol_answer
from pushd.gateway.registry import DeviceRegistry
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
        def renew(url, ident, **kw):
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

        def fail(url, ident, **kw):
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


class _Answer:
    def __init__(self, body):
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, limit):
        return self.body[:limit]


class SkewedClockRenewalTests(unittest.TestCase):
    """
    Review item 6: a device whose clock is off by more than the gateway's window renews all the
    same, stamped with the gateway's clock (from its ConnectAcks, or from a StaleRequest answer).
    The gateway is a real Enrolment and registry; only the HTTPS hop is replaced by a call.
    """

    SKEW = 1000.0  # the device's clock is this far ahead of the gateway's

    def setUp(self):
        self.ident = new_identity(Path(self.mktemp()), days=30.0)
        self.gw_clock = task.Clock()
        self.gw_clock.advance(time.time())
        self.clock = task.Clock()  # the device's
        self.clock.advance(self.gw_clock.seconds() + self.SKEW)
        gw_state = Path(self.mktemp())
        gw_state.mkdir()
        self.registry = DeviceRegistry(gw_state / "devices.sqlite3")
        self.addCleanup(self.registry.close)
        self.registry.record_cert(self.ident.cert, "test")
        pki = SimpleNamespace(ca_key=CA_KEY, ca_cert=CA_CERT, enrol_secret=b"unused")
        self.enrolment = Enrolment(pki, None, self.registry, self.gw_clock)
        self.patch(identity_mod.urllib.request, "urlopen", self.urlopen)
        self.factory = SimpleNamespace(private_key=self.ident.key, certificate_der=self.ident.cert_der,
                                       clock_offset=0.0)
        self.answers = []

    def urlopen(self, req, context, timeout):
        status, _, body = enrol_answer(self.enrolment, req.data, False, "IPv4Address(type='TCP', host='192.0.2.7', port=1)")
        self.answers.append((status, json.loads(body).get("reason")))
        if status != 200:
            raise urllib.error.HTTPError(req.full_url, status, "refused", {}, io.BytesIO(body))
        return _Answer(body)

    def renewer(self):
        def in_thread(f, *a):
            try:
                return defer.succeed(f(*a))
            except Exception:
                return defer.fail(Failure())

        r = Renewer(self.ident, self.factory, "https://gateway", self.clock, rng=random.Random(1),
                    in_thread=in_thread)
        self.addCleanup(r.stopService)
        return r

    def test_stamped_with_the_clock_offset_from_connect_acks(self):
        self.factory.clock_offset = -self.SKEW  # as the courier learned it from a ConnectAck
        old = self.ident.cert.serial_number
        self.renewer().renew()
        self.assertEqual(self.answers, [(200, None)])
        self.assertNotEqual(self.ident.cert.serial_number, old)

    def test_stale_answer_carries_the_gateway_time_for_the_next_try(self):
        """Never connected (no offset yet): the first try is stale, the next one uses the gateway's time."""
        r = self.renewer()
        r.running = True
        old = self.ident.cert.serial_number
        r.renew()
        self.assertEqual(self.answers, [(403, "StaleRequest")])
        self.assertEqual(self.ident.cert.serial_number, old)
        (retry,) = self.clock.getDelayedCalls()
        delay = retry.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        self.gw_clock.advance(delay)
        self.assertEqual(self.answers, [(403, "StaleRequest"), (200, None)])
        self.assertNotEqual(self.ident.cert.serial_number, old)

    def test_key_kept_across_retries_so_a_lost_answer_is_answered_again(self):
        """The gateway answered but the device did not hear it: the retry with the same key is certified."""
        self.factory.clock_offset = -self.SKEW
        r = self.renewer()
        r.running = True
        real_post = identity_mod._post

        def lost(*a):
            real_post(*a)
            raise identity_mod.EnrolError("cannot reach the gateway at https://gateway: timed out")

        self.patch(identity_mod, "_post", lost)
        r.renew()
        key = r._key
        self.assertIsNotNone(key)
        self.patch(identity_mod, "_post", real_post)
        (retry,) = self.clock.getDelayedCalls()
        self.clock.advance(retry.getTime() - self.clock.seconds())
        self.assertEqual(self.answers, [(200, None), (200, None)])
        self.assertIs(self.ident.key, key)
        self.assertIsNone(r._key)


class DurableWriteTests(unittest.TestCase):
    def test_file_and_directory_are_fsynced_before_the_write_returns(self):
        """The renewal's crash safety rests on the order of its writes surviving a power cut."""
        synced = []
        real = private.os.fsync

        def fsync(fd):
            synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
            real(fd)

        self.patch(private.os, "fsync", fsync)
        d = Path(self.mktemp())
        d.mkdir()
        private.write(d / "x", b"data")
        self.assertEqual(synced, [False, True])
        self.assertEqual(stat.S_IMODE(os.stat(d / "x").st_mode), 0o600)
