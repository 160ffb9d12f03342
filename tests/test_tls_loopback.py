"""The device's TLS to a real courier listener on loopback: the gateway's name is verified."""

import datetime
from pathlib import Path

from twisted.internet import defer, endpoints, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from pushd import tls
from pushd.device.courier import CourierClientFactory, ICourierListener
from pushd.device.transports import TLSTransport
from pushd.gateway.courier import CourierFactory
from pushd.gateway.router import Router
from pushd.gateway.tokens import TokenMinter
from pushd.store.memory import MemoryStore

from .helpers import Device


@implementer(ICourierListener)
class Listener:
    def __init__(self):
        self.up = defer.Deferred()

    def connected(self, proto, base_token):
        if not self.up.called:
            self.up.callback(base_token)

    def disconnected(self, reason):
        pass

    def tokenReceived(self, topic_hash, token):
        pass

    def notificationReceived(self, msg):
        return 0

    def keepaliveSent(self):
        pass

    def keepaliveAnswered(self):
        pass


class GatewayNameTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.pki = tls.load_or_create_pki(Path(self.mktemp()), ["localhost", "127.0.0.1"])
        self.router = Router(MemoryStore(), TokenMinter(b"k"))
        courier = CourierFactory(self.router, self.pki.ca_cert)
        wrapped = TLSMemoryBIOFactory(self.pki.server_options(tls.COURIER_ALPN), False, courier)
        self.port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(wrapped)
        self.addCleanup(self.port.stopListening)
        self.device = Device(ca=(self.pki.ca_key, self.pki.ca_cert))

    def factory(self, name):
        listener = Listener()
        transport = TLSTransport("127.0.0.1", self.port.getHost().port, tls.cert_pem(self.pki.ca_cert), name)
        return CourierClientFactory(listener, [transport], self.device.key, self.device.der, max_delay=0.2), listener

    @defer.inlineCallbacks
    def test_right_name_connects(self):
        f, listener = self.factory("localhost")
        f.start()
        token = yield listener.up
        self.assertEqual(token, self.router.tokens.base_token(self.device.id))
        self.assertEqual((f.successes, f.failures), (1, 0))
        yield f.stop()
        while self.router.sessions:  # the gateway's side of the close
            yield task_sleep(0.01)

    @defer.inlineCallbacks
    def test_wrong_name_never_connects(self):
        f, listener = self.factory("push.example.org")
        f.start()
        while f.failures < 3:
            yield task_sleep(0.05)
        yield f.stop()
        self.assertFalse(listener.up.called)
        self.assertEqual(f.successes, 0)
        self.assertEqual(self.router.sessions, {})


class HandshakeFailureLogTests(unittest.TestCase):
    """A device whose clock is behind the gateway's certificates by more than their backdating
    fails every TLS handshake; its log must say why (it said only "reconnecting in 0.8 s")."""

    @defer.inlineCallbacks
    def setUp(self):
        # Certificates made two hours from now: on this clock, as on a device two hours behind.
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)
        self.patch(tls, "_now", lambda: later)
        self.pki = tls.load_or_create_pki(Path(self.mktemp()), ["localhost", "127.0.0.1"])
        self.patch(tls, "_now", lambda: datetime.datetime.now(datetime.timezone.utc))
        courier = CourierFactory(Router(MemoryStore(), TokenMinter(b"k")), self.pki.ca_cert)
        wrapped = TLSMemoryBIOFactory(self.pki.server_options(tls.COURIER_ALPN), False, courier)
        self.port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(wrapped)
        self.addCleanup(self.port.stopListening)
        self.lines = []
        observer = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @defer.inlineCallbacks
    def test_not_yet_valid_is_named_on_one_line(self):
        device = Device(ca=(self.pki.ca_key, self.pki.ca_cert))
        transport = TLSTransport("127.0.0.1", self.port.getHost().port, tls.cert_pem(self.pki.ca_cert), "localhost")
        f = CourierClientFactory(Listener(), [transport], device.key, device.der, max_delay=0.2)
        f.start()
        while f.failures < 2:
            yield task_sleep(0.05)
        yield f.stop()
        self.assertEqual(f.successes, 0)
        why = [line for line in self.lines if "ended before Connect was accepted" in line]
        # One line per failed attempt; an attempt ending while stop() runs may be logged
        # and not yet counted (or counted and not yet logged): seen in CI under load.
        self.assertGreaterEqual(len(why), 2, self.lines)
        self.assertLessEqual(abs(len(why) - f.failures), 1, self.lines)
        self.assertIn("certificate is not yet valid", why[0])
        self.assertIn("valid " + (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H"), why[0])
        self.assertNotIn("\n", why[0])


def task_sleep(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
