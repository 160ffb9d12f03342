import datetime

from OpenSSL import crypto
from twisted.trial import unittest

from pushd import tls, wire

from .helpers import CA_CERT, OTHER_CA_CERT, OTHER_CA_KEY, Device, T0


class ConnectProofTests(unittest.TestCase):
    def check(self, device, now=T0, **kw):
        c = device.connect(now, **kw)
        return tls.verify_connect(CA_CERT, c.certificate, c.nonce, c.signature, T0)

    def test_ec_device(self):
        d = Device("ec")
        self.assertEqual(self.check(d), d.id)

    def test_rsa_device(self):
        d = Device("rsa")
        self.assertEqual(self.check(d), d.id)

    def test_other_ca(self):
        d = Device(ca=(OTHER_CA_KEY, OTHER_CA_CERT))
        with self.assertRaisesRegex(tls.AuthError, "not issued by"):
            self.check(d)

    def test_stale_nonce(self):
        with self.assertRaisesRegex(tls.AuthError, "stale nonce"):
            self.check(Device(), now=T0 - 3600)

    def test_unsigned(self):
        with self.assertRaisesRegex(tls.AuthError, "signature"):
            self.check(Device(), signature=b"")

    def test_signature_by_another_key(self):
        d, other = Device(), Device()
        c = d.connect(T0)
        forged = tls.sign_nonce(other.key, c.nonce)
        with self.assertRaisesRegex(tls.AuthError, "bad signature"):
            tls.verify_connect(CA_CERT, c.certificate, c.nonce, forged, T0)

    def test_scheme_must_match_key(self):
        d = Device("ec")
        c = d.connect(T0)
        with self.assertRaisesRegex(tls.AuthError, "does not match"):
            tls.verify_connect(CA_CERT, c.certificate, c.nonce, wire.SIG_RSA_PKCS1_SHA1 + c.signature[2:], T0)

    def test_garbage_certificate(self):
        with self.assertRaisesRegex(tls.AuthError, "not DER"):
            tls.verify_connect(CA_CERT, b"nope", b"\x00" * 17, b"", T0)

    def test_bad_nonce_shape(self):
        d = Device()
        c = d.connect(T0)
        with self.assertRaisesRegex(tls.AuthError, "nonce"):
            tls.verify_connect(CA_CERT, c.certificate, c.nonce[:10], c.signature, T0)


class PKITests(unittest.TestCase):
    def test_created_once_then_loaded(self):
        from pathlib import Path

        state = Path(self.mktemp())
        first = tls.load_or_create_pki(state, ["localhost", "127.0.0.1"])
        second = tls.load_or_create_pki(state, ["localhost", "127.0.0.1"])
        self.assertEqual(first.ca_cert, second.ca_cert)
        self.assertEqual(first.server_cert, second.server_cert)
        self.assertEqual(first.provider_key, second.provider_key)
        self.assertEqual((state / "ca.key").stat().st_mode & 0o777, 0o600)
        third = tls.load_or_create_pki(state, ["push.example.org"])
        self.assertNotEqual(third.server_cert, first.server_cert)
        self.assertEqual(third.ca_cert, first.ca_cert)


class BackdateTests(unittest.TestCase):
    """A device whose clock is behind must accept a gateway installed a minute ago (and the
    gateway a device enrolled a minute ago): every certificate is valid from an hour back.
    Checked with OpenSSL's chain verification (what the TLS handshake runs) at a set time."""

    def setUp(self):
        self.ca_key, self.ca = tls.make_ca()
        _, self.server = tls.issue_server_cert(self.ca_key, self.ca, ["localhost"])
        self.device = tls.issue_device_cert(self.ca_key, self.ca, tls.new_key("ec").public_key())

    def verify_at(self, minutes_behind, cert):
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(self.ca))
        store.set_time(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=minutes_behind))
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert)).verify_certificate()

    def test_fresh_certificates_verify_on_a_clock_55_minutes_behind(self):
        for cert in (self.server, self.device):
            self.verify_at(55, cert)

    def test_not_before_an_hour_back(self):
        with self.assertRaisesRegex(crypto.X509StoreContextError, "not yet valid"):
            self.verify_at(65, self.server)
