"""
A captured Connect replayed on a new TLS connection to a real gateway process: refused,
with the reason in the gateway's log, while the device it was captured from stays
connected and receives a push. Both forms: the pushd device's (bound to its TLS session
by the exporter; TLS 1.3 and 1.2) and the nonce-only one of APNs-style clients.
"""

from __future__ import annotations

import json
import re

from cryptography import x509
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial import unittest
from zope.interface import implementer

from pushd import tls, wire
from pushd.device.courier import CourierClientFactory, CourierClientProtocol, ICourierListener
from pushd.gateway.registry import DeviceRegistry
from pushd.gateway.tokens import TokenMinter

from .helpers import Device, frames_of
from .stack import TOPIC, Stack
from .test_e2e import raw_exchange

TH = wire.topic_hash(TOPIC)
BOUND_REFUSED = "Connect refused: bad signature over the nonce and this connection's TLS exporter"
#: RFC 7627's SSL_OP_NO_EXTENDED_MASTER_SECRET (pyOpenSSL has no name for it).
OP_NO_EXTENDED_MASTER_SECRET = 0x1


@implementer(ICourierListener)
class Victim:
    """The honest device's side: asks for its topic, keeps what arrives."""

    def __init__(self):
        self.up = defer.Deferred()
        self.pushes = defer.DeferredQueue()
        self.lost = []
        self.proto = None

    def connected(self, proto, base_token):
        self.proto = proto
        proto.send(wire.Filter(token=base_token, enabled=[TH]))
        if not self.up.called:
            self.up.callback(proto)

    def disconnected(self, reason):
        self.lost.append(reason)

    def tokenReceived(self, topic_hash, token):
        pass

    def notificationReceived(self, msg):
        self.pushes.put(msg)
        return wire.STATUS_OK

    def keepaliveSent(self):
        pass

    def keepaliveAnswered(self):
        pass


class Recording(CourierClientProtocol):
    """pushd's device protocol, keeping a copy of the Connect it sends (the capture)."""

    def send(self, message):
        if isinstance(message, wire.Connect):
            self.factory.captured.append(message.encode())
        super().send(message)


class Tls:
    """The device's TLS transport, with the TLS version and extension the test asks for."""

    def __init__(self, port, ca_pem, max_version=None, ems=True):
        self.port, self.ca_pem, self.max_version, self.ems = port, ca_pem, max_version, ems

    def connect(self, reactor, factory):
        extra = {"lowerMaximumSecurityTo": self.max_version} if self.max_version else None
        options = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(self.ca_pem),
                                          acceptableProtocols=tls.COURIER_ALPN, extraCertificateOptions=extra)
        if not self.ems:
            options = NoExtendedMasterSecret(options)
        return reactor.connectSSL("127.0.0.1", self.port, factory, options, timeout=5)

    def describe(self):
        return f"tls:127.0.0.1:{self.port}"


@implementer(IOpenSSLClientConnectionCreator)
class NoExtendedMasterSecret:
    """A client that does not offer RFC 7627's extension (an old or odd TLS 1.2 stack)."""

    def __init__(self, inner):
        self.inner = inner

    def clientConnectionForTLS(self, tlsProtocol):
        from OpenSSL._util import lib

        conn = self.inner.clientConnectionForTLS(tlsProtocol)
        lib.SSL_set_options(conn._ssl, OP_NO_EXTENDED_MASTER_SECRET)
        return conn


class NonceOnlyClient(protocol.Protocol):
    """An APNs-style client (as pypush): its Connect signs the nonce alone."""

    def __init__(self, connect: bytes):
        self.connect = connect
        self.decoder = wire.FrameDecoder()
        self.up = defer.Deferred()
        self.pushes = defer.DeferredQueue()
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.connect)

    def dataReceived(self, data):
        for frame in self.decoder.feed(data):
            msg = wire.parse(frame)
            if isinstance(msg, wire.ConnectAck) and msg.status == wire.STATUS_OK:
                self.transport.write(wire.Filter(token=msg.token, enabled=[TH]).encode())
                self.up.callback(msg)
            elif isinstance(msg, wire.Notification):
                self.transport.write(wire.NotificationAck(token=msg.token, message_id=msg.message_id,
                                                          status=wire.STATUS_OK).encode())
                self.pushes.put(msg)

    def connectionLost(self, reason):
        self.closed.callback(None)


class ConnectReplayTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.s = Stack(self)
        yield self.s.start_gateway()
        gw = self.s.gw_state
        self.ca_pem = (gw / "ca.pem").read_bytes()
        ca = (tls.load_key((gw / "ca.key").read_bytes()), x509.load_pem_x509_certificate(self.ca_pem))
        # A real device certificate of this gateway's CA, as enrolment would issue it.
        self.device = Device(ca=ca)
        # ... and recorded in the gateway's registry, as enrolment does (unrecorded ones are refused).
        registry = DeviceRegistry(gw / "devices.sqlite3")
        registry.record_cert(x509.load_der_x509_certificate(self.device.der), "test")
        registry.close()
        self.tokens = TokenMinter((gw / "token.secret").read_bytes().strip())

    @defer.inlineCallbacks
    def pushd_device(self, **tls_kw):
        victim = Victim()
        f = CourierClientFactory(victim, [Tls(self.s.courier_port, self.ca_pem, **tls_kw)],
                                 self.device.key, self.device.der, max_delay=0.5)
        f.protocol = Recording
        f.captured = []
        self.addCleanup(f.stop)
        f.start()
        yield victim.up
        return f, victim

    @defer.inlineCallbacks
    def assertReplayRefused(self, captured, reason, pushes):
        """Replay on a new TLS connection: refused with ``reason``; the victim keeps its session."""
        mark = len(self.s.gateway.lines)
        closed, back = yield raw_exchange(self.s.courier_port, self.ca_pem, captured)
        self.assertTrue(closed, "the gateway closes the replayer's connection")
        (ack,) = frames_of(back)
        self.assertEqual(ack.status, wire.STATUS_ERROR)
        yield self.s.gateway.wait_for(re.escape(reason), timeout=10, after=mark)
        token = self.tokens.scoped_token(self.device.id, TH).hex()
        out, err, code = yield self.s.send(token, {"to": "the real device"})
        self.assertTrue(out.startswith(b"200 "), out + err)
        msg = yield pushes.get()
        self.assertEqual(json.loads(msg.payload), {"to": "the real device"})
        self.assertEqual(self.s.gateway.count("replaced by a newer connection"), 0, self.s.gateway.log())

    def connected_line(self, proof):
        return self.s.gateway.wait_for(rf"device {self.device.id} connected from .* \(Connect {re.escape(proof)}\)",
                                       timeout=10)

    @defer.inlineCallbacks
    def test_bound_connect_replayed_tls13(self):
        f, victim = yield self.pushd_device()
        self.assertEqual(victim.proto.transport.getHandle().get_protocol_version_name(), "TLSv1.3")
        yield self.connected_line("bound to its TLS session")
        (captured,) = f.captured
        self.assertEqual(wire.parse(next(wire.FrameDecoder().feed(captured))).binding, wire.BINDING_TLS_EXPORTER)
        yield self.assertReplayRefused(captured, BOUND_REFUSED, victim.pushes)
        self.assertEqual(victim.lost, [])

    @defer.inlineCallbacks
    def test_bound_connect_replayed_tls12(self):
        f, victim = yield self.pushd_device(max_version=ssl.TLSVersion.TLSv1_2)
        self.assertEqual(victim.proto.transport.getHandle().get_protocol_version_name(), "TLSv1.2")
        yield self.connected_line("bound to its TLS session")
        yield self.assertReplayRefused(f.captured[0], BOUND_REFUSED, victim.pushes)
        self.assertEqual(victim.lost, [])

    @defer.inlineCallbacks
    def test_tls12_without_extended_master_secret_signs_the_nonce_alone(self):
        """No safe exporter: the device falls back to the nonce-only form, which the
        gateway accepts once."""
        f, victim = yield self.pushd_device(max_version=ssl.TLSVersion.TLSv1_2, ems=False)
        yield self.connected_line("nonce only")
        self.assertIsNone(wire.parse(next(wire.FrameDecoder().feed(f.captured[0]))).binding)
        yield self.assertReplayRefused(
            f.captured[0], f"Connect refused: replayed Connect of device {self.device.id}", victim.pushes)
        self.assertEqual(victim.lost, [])

    @defer.inlineCallbacks
    def test_nonce_only_connect_replayed(self):
        captured = self.device.connect(reactor.seconds()).encode()
        client = NonceOnlyClient(captured)
        opts = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(self.ca_pem),
                                       acceptableProtocols=tls.COURIER_ALPN)
        connector = reactor.connectSSL("127.0.0.1", self.s.courier_port,
                                       protocol.ClientFactory.forProtocol(lambda: client), opts)
        self.addCleanup(lambda: (connector.disconnect(), client.closed)[1])
        yield client.up
        yield self.connected_line("nonce only")
        yield self.assertReplayRefused(
            captured, f"Connect refused: replayed Connect of device {self.device.id}", client.pushes)
        self.assertFalse(client.closed.called, "the real client is still connected")

    @defer.inlineCallbacks
    def test_device_daemon_binds_its_connect(self):
        yield self.s.start_device()
        yield self.s.gateway.wait_for(r"connected from .* \(Connect bound to its TLS session\)", timeout=10)
