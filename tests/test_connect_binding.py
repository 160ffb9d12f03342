"""
The Connect proof bound to its TLS connection (exporter), and the courier's two paths:
bound Connects verified against this connection's exporter, nonce-only Connects accepted
once through the replay cache.
"""

from pathlib import Path

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pushd import tls, wire
from pushd.gateway.replay import MemoryReplayCache

from .helpers import CA_CERT, T0, Device, Gateway, frames_of

TH = wire.topic_hash("com.example.app")
#: RFC 7627's SSL_OP_NO_EXTENDED_MASTER_SECRET (pyOpenSSL has no name for it).
OP_NO_EXTENDED_MASTER_SECRET = 0x1


def bound_connect(device, now, exporter, **kw):
    nonce = tls.make_nonce(now)
    fields = dict(certificate=device.der, nonce=nonce, signature=tls.sign_nonce(device.key, nonce, exporter),
                  binding=wire.BINDING_TLS_EXPORTER)
    fields.update(kw)
    return wire.Connect(**fields)


class BoundProofTests(unittest.TestCase):
    def test_bound_signature_verifies_with_its_exporter_only(self):
        for kind in ("ec", "rsa"):
            d = Device(kind)
            c = bound_connect(d, T0, b"E" * 32)
            self.assertEqual(tls.verify_connect(CA_CERT, c.certificate, c.nonce, c.signature, T0, b"E" * 32), d.id)
            with self.assertRaisesRegex(tls.AuthError, "bad signature over the nonce and this connection's TLS exporter"):
                tls.verify_connect(CA_CERT, c.certificate, c.nonce, c.signature, T0, b"F" * 32)

    def test_forms_do_not_cross(self):
        """Stripping field 33 from a bound Connect does not make it a valid nonce-only one,
        nor does adding it to a nonce-only one."""
        d = Device()
        c = bound_connect(d, T0, b"E" * 32)
        with self.assertRaisesRegex(tls.AuthError, "bad signature over the nonce$"):
            tls.verify_connect(CA_CERT, c.certificate, c.nonce, c.signature, T0)
        plain = d.connect(T0)
        with self.assertRaisesRegex(tls.AuthError, "bad signature"):
            tls.verify_connect(CA_CERT, plain.certificate, plain.nonce, plain.signature, T0, b"E" * 32)


class _Handle:
    def __init__(self, conn):
        self.conn = conn

    def getHandle(self):
        return self.conn


def handshake(pki, max_version=None, ems=True):
    """A real OpenSSL handshake over memory BIOs, with the gateway's server options."""
    server = SSL.Connection(pki.server_options(tls.COURIER_ALPN).getContext(), None)
    server.set_accept_state()
    ctx = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if not ems:
        ctx.set_options(OP_NO_EXTENDED_MASTER_SECRET)
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    unfinished = None
    for step in range(8):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        if step == 1:  # the server has sent its Finished, not yet read the client's
            unfinished = _Handle(server)
            try:
                tls.session_exporter(unfinished)
            except tls.NoExporter as e:
                unfinished = str(e)
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return _Handle(client), _Handle(server), unfinished


class ExporterTests(unittest.TestCase):
    def setUp(self):
        self.pki = tls.load_or_create_pki(Path(self.mktemp()), ["localhost"])

    def test_tls13_and_tls12_with_ems_both_ends_agree_and_connections_differ(self):
        for version in (None, SSL.TLS1_2_VERSION):
            c1, s1, unfinished = handshake(self.pki, version)
            self.assertEqual(s1.conn.get_protocol_version_name(), "TLSv1.2" if version else "TLSv1.3")
            self.assertEqual(unfinished, "TLS handshake not finished")
            e1 = tls.session_exporter(s1)
            self.assertEqual(len(e1), 32)
            self.assertEqual(tls.session_exporter(c1), e1)
            c2, s2, _ = handshake(self.pki, version)
            self.assertNotEqual(tls.session_exporter(s2), e1, "another connection, another exporter")

    def test_tls12_without_extended_master_secret_has_none(self):
        client, server, _ = handshake(self.pki, SSL.TLS1_2_VERSION, ems=False)
        for end in (client, server):
            with self.assertRaisesRegex(tls.NoExporter, "TLSv1.2 without extended master secret"):
                tls.session_exporter(end)

    def test_not_tls(self):
        with self.assertRaisesRegex(tls.NoExporter, "not a TLS connection"):
            tls.session_exporter(StringTransport())


class LogCapture:
    def __init__(self, case):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def reasons(self):
        # One reason per line, or (refusals before Connect, logged at most once a second)
        # the reasons counted together in one line.
        out = []
        for e in self.events:
            if "reason" in e:
                out.append(e["reason"])
            out.extend(e.get("counts", ()))
        return out


class CourierReplayTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway()
        self.log = LogCapture(self)

    def send(self, data):
        proto, t = self.gw.connection()
        proto.dataReceived(data)
        return proto, t, frames_of(t.value())

    def test_nonce_only_connect_replayed_is_refused_and_the_first_session_kept(self):
        d = Device()
        data = d.connect(self.gw.clock.seconds()).encode()
        p1, t1, (ack1,) = self.send(data)
        self.assertEqual(ack1.status, wire.STATUS_OK)
        self.gw.clock.advance(5)
        p2, t2, (ack2,) = self.send(data)
        self.assertEqual(ack2.status, wire.STATUS_ERROR)
        self.assertTrue(t2.disconnecting)
        self.assertFalse(t1.disconnecting, "the real device's session was not replaced")
        self.assertIs(self.gw.router.sessions[d.id], p1.session)
        self.assertEqual(self.gw.factory.auth_failures, 1)
        self.assertIn(f"Connect refused: replayed Connect of device {d.id} (its nonce was accepted before)",
                      self.log.reasons())
        # Past the window the same bytes are stale, whatever the cache forgot.
        self.gw.clock.advance(300)
        p3, t3, (ack3,) = self.send(data)
        self.assertEqual(ack3.status, wire.STATUS_ERROR)
        self.assertRegex(self.log.reasons()[-1], "stale nonce")

    def test_a_new_nonce_of_the_same_device_connects(self):
        d = Device()
        self.send(d.connect(self.gw.clock.seconds()).encode())
        p2, t2, (ack,) = self.send(d.connect(self.gw.clock.seconds()).encode())
        self.assertEqual(ack.status, wire.STATUS_OK)

    def test_full_cache_refuses_nonce_only_connects(self):
        self.gw.factory.replay_cache = MemoryReplayCache(1, self.gw.clock)
        self.send(Device().connect(self.gw.clock.seconds()).encode())
        p, t, (ack,) = self.send(Device().connect(self.gw.clock.seconds()).encode())
        self.assertEqual(ack.status, wire.STATUS_ERROR)
        self.assertIsNone(p.device_id)
        self.assertIn("Connect refused: replay cache full (1 nonces): nonce-only Connects refused until nonces expire",
                      self.log.reasons())

    def test_bound_connect_without_tls_is_refused(self):
        """Behind a TLS-terminating proxy the gateway has no exporter to check against."""
        c = bound_connect(Device(), self.gw.clock.seconds(), b"E" * 32)
        p, t, (ack,) = self.send(c.encode())
        self.assertEqual(ack.status, wire.STATUS_ERROR)
        self.assertIn("Connect refused: Connect bound to its TLS session, but not a TLS connection",
                      self.log.reasons())

    def test_unknown_binding_is_refused(self):
        c = Device().connect(self.gw.clock.seconds(), binding=7)
        p, t, (ack,) = self.send(c.encode())
        self.assertEqual(ack.status, wire.STATUS_ERROR)
        self.assertIn("Connect refused: unknown Connect binding 7", self.log.reasons())


class SlowCache:
    """A cache that answers later, as a remote (Redis) one does."""

    def __init__(self):
        self.calls = []

    def seen(self, key, expires_at, owner=None):
        d = defer.Deferred()
        self.calls.append(d)
        return d


class RemoteCacheTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway()
        self.cache = self.gw.factory.replay_cache = SlowCache()
        self.proto, self.t = self.gw.connection()

    def test_frames_after_connect_wait_for_the_answer(self):
        d = Device()
        self.proto.dataReceived(d.connect(self.gw.clock.seconds()).encode() + wire.Filter(enabled=[TH]).encode())
        self.proto.dataReceived(wire.KeepAlive().encode())
        self.assertEqual(self.t.value(), b"")
        self.assertEqual(self.t.producerState, "paused", "nothing more is read meanwhile")
        self.cache.calls[0].callback(False)
        self.assertEqual([type(m) for m in frames_of(self.t.value())], [wire.ConnectAck, wire.KeepAliveAck])
        self.assertFalse(self.t.disconnecting)
        self.assertEqual(self.proto.session.topics, {TH})
        self.assertEqual(self.t.producerState, "producing")

    def test_answer_after_the_connection_closed_does_nothing(self):
        d = Device()
        self.proto.dataReceived(d.connect(self.gw.clock.seconds()).encode())
        self.proto.connectionLost(None)
        self.cache.calls[0].callback(False)
        self.assertEqual(self.t.value(), b"")
        self.assertEqual(self.gw.router.sessions, {})

    def test_cache_failure_refuses(self):
        self.proto.dataReceived(Device().connect(self.gw.clock.seconds()).encode())
        self.cache.calls[0].errback(ConnectionError("Redis did not answer"))
        (ack,) = frames_of(self.t.value())
        self.assertEqual(ack.status, wire.STATUS_ERROR)
        self.assertTrue(self.t.disconnecting)
