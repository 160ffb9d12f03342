"""The listeners' TLS policy, over real sockets: TLS 1.2+ only, AEAD suites only, ECDSA P-256
keys by default, and state directories made with RSA keys still served."""

import socket
import ssl as stdlib_ssl
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, endpoints, protocol, reactor, threads
from twisted.trial import unittest

from pushd import tls
from pushd.endpoints import LeanTLSFactory

AEAD_TLS12 = set(tls.SERVER_CIPHERS.split(":"))
CBC_SHA1 = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:AES128-SHA:AES256-SHA"


def handshake(port, minimum=None, maximum=None, ciphers=None):
    """A blocking stdlib TLS client (run in a thread): (version, cipher) or the SSLError."""
    ctx = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = stdlib_ssl.CERT_NONE
    if ciphers:
        ctx.set_ciphers(ciphers)
    if minimum:
        ctx.minimum_version = minimum
    if maximum:
        ctx.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                return s.version(), s.cipher()[0]
        except (stdlib_ssl.SSLError, ConnectionError) as e:
            return e


def rsa_state_dir(path: Path):
    """A state directory as an RSA-era gateway left it: RSA CA and server keys."""
    path.mkdir(parents=True)
    ca_key = tls.new_key("rsa")
    orig = tls.new_key
    try:
        tls.new_key = lambda kind="ec": ca_key
        _, ca_cert = tls.make_ca()
    finally:
        tls.new_key = orig
    server_key, server_cert = tls.issue_server_cert(ca_key, ca_cert, ["localhost", "127.0.0.1"], tls.new_key("rsa"))
    tls.write_private(path / "ca.key", tls.key_pem(ca_key))
    (path / "ca.pem").write_bytes(tls.cert_pem(ca_cert))
    tls.write_private(path / "server.key", tls.key_pem(server_key))
    (path / "server.pem").write_bytes(tls.cert_pem(server_cert))


class PolicyTests(unittest.TestCase):
    state = None

    @defer.inlineCallbacks
    def setUp(self):
        state = Path(self.mktemp())
        if self.state == "rsa":
            rsa_state_dir(state)
        self.pki = tls.load_or_create_pki(state, ["localhost", "127.0.0.1"])
        factory = LeanTLSFactory(self.pki.server_options(tls.COURIER_ALPN), False,
                                 protocol.Factory.forProtocol(protocol.Protocol))
        self.port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(self.port.stopListening)

    def connect(self, **kw):
        return threads.deferToThread(handshake, self.port.getHost().port, **kw)

    def test_fresh_state_dir_is_ecdsa_p256(self):
        for key in (self.pki.ca_key, self.pki.server_key):
            self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
            self.assertEqual(key.curve.name, "secp256r1")

    @defer.inlineCallbacks
    def test_cbc_sha1_only_client_refused(self):
        got = yield self.connect(maximum=stdlib_ssl.TLSVersion.TLSv1_2, ciphers=CBC_SHA1)
        self.assertIsInstance(got, Exception, f"negotiated {got}")

    @defer.inlineCallbacks
    def test_tls11_refused(self):
        got = yield self.connect(minimum=stdlib_ssl.TLSVersion.TLSv1_1, maximum=stdlib_ssl.TLSVersion.TLSv1_1,
                                 ciphers="ALL:@SECLEVEL=0")
        self.assertIsInstance(got, Exception, f"negotiated {got}")

    @defer.inlineCallbacks
    def test_tls12_gets_an_aead_suite(self):
        version, cipher = yield self.connect(maximum=stdlib_ssl.TLSVersion.TLSv1_2)
        self.assertEqual(version, "TLSv1.2")
        self.assertIn(cipher, AEAD_TLS12)

    @defer.inlineCallbacks
    def test_tls12_every_offered_suite_is_aead(self):
        """Offer everything the client has, one suite at a time: only AEAD ones are taken."""
        names = [c["name"] for c in stdlib_ssl.create_default_context().get_ciphers()
                 if c["protocol"] == "TLSv1.2"]
        names += ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-RSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"]
        taken = set()
        for name in names:
            try:
                got = yield self.connect(maximum=stdlib_ssl.TLSVersion.TLSv1_2, ciphers=name)
            except stdlib_ssl.SSLError:
                continue  # the client itself cannot offer it
            if not isinstance(got, Exception):
                taken.add(got[1])
        self.assertTrue(taken)
        self.assertLessEqual(taken, AEAD_TLS12)

    @defer.inlineCallbacks
    def test_tls13_defaults(self):
        version, cipher = yield self.connect(minimum=stdlib_ssl.TLSVersion.TLSv1_3)
        self.assertEqual(version, "TLSv1.3")
        self.assertIn(cipher, {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"})


class RSAStateDirTests(PolicyTests):
    """A state directory with RSA keys keeps working, under the same policy (ECDHE-RSA + AEAD)."""

    state = "rsa"

    def test_fresh_state_dir_is_ecdsa_p256(self):
        self.assertIsInstance(self.pki.ca_key, rsa.RSAPrivateKey)
        self.assertIsInstance(self.pki.server_key, rsa.RSAPrivateKey)
