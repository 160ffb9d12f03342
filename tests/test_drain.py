"""The gateway's drain on SIGTERM (pushd.gateway.drain), its parts driven by a Clock."""

from __future__ import annotations

import uuid
from io import BytesIO

from twisted.internet import defer, reactor, ssl
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from pushd import wire
from pushd.gateway.drain import Drain

from . import h2client
from .helpers import Device, Gateway, frames_of
from .test_provider import ServerMixin

TOPIC = "com.example.app"
TH = wire.topic_hash(TOPIC)


class Logged:
    """The log events emitted while it is installed."""

    def __init__(self, case):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def formats(self):
        return [e.get("log_format") for e in self.events]


class CourierDrainTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway(window=8)

    def device(self, pushd=True, filter_=True):
        d = Device()
        proto, t = self.gw.connection()
        proto.dataReceived(d.connect(self.gw.clock.seconds(), pushd_version=1 if pushd else None).encode())
        t.clear()
        if filter_:
            proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        return d, proto, t

    def push(self, device, n=1):
        token = self.gw.tokens.scoped_token(device.id, TH)
        for i in range(n):
            self.successResultOf(self.gw.router.accept(token, TOPIC, b'{"n":%d}' % i, uuid.uuid4(),
                                                       expiry=int(self.gw.clock.seconds()) + 3600))

    def lost(self, *protos):
        for p in protos:
            p.connectionLost(Failure(ConnectionDone()))

    def test_pushd_device_told_to_go_and_closed(self):
        d, proto, t = self.device()
        done = self.gw.factory.drain(window=2.5, timeout=5)
        self.assertEqual(frames_of(t.value()), [wire.GoAway(window_ms=2500)])
        self.assertTrue(t.disconnecting, "nothing in flight: closed at once")
        self.assertEqual(self.successResultOf(done), {"told": 1, "closed": 0, "unacked": 0, "aborted": 0},
                         "nothing awaited: its TLS close is not waited for")
        self.lost(proto)

    def test_apns_style_client_just_sees_the_close(self):
        """No pushd extension in its Connect: no GoAway (it would not know command 33)."""
        d, proto, t = self.device(pushd=False)
        done = self.gw.factory.drain(window=2, timeout=5)
        self.assertEqual(t.value(), b"")
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.successResultOf(done)["closed"], 1)

    def test_apns_style_client_closed_with_messages_in_flight(self):
        """Closed at once all the same: what it had not acked is counted, and stays stored."""
        d, proto, t = self.device(pushd=False)
        self.push(d, 2)
        counts = self.successResultOf(self.gw.factory.drain(window=1, timeout=5))
        self.assertEqual((counts["closed"], counts["unacked"]), (1, 2))
        self.assertEqual(len(self.successResultOf(self.gw.store.pending(d.id, {TH}, 100, 0))), 2)

    def test_unauthenticated_connections_closed(self):
        proto, t = self.gw.connection()
        done = self.gw.factory.drain(window=2, timeout=5)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.successResultOf(done)["closed"], 1)

    def test_acks_of_what_is_in_flight_still_taken(self):
        """In flight at the drain: nothing more is sent, the acks that come are deleted, and
        the device closes the connection itself."""
        d, proto, t = self.device()
        self.push(d, 3)
        sent = frames_of(t.value())
        t.clear()
        self.assertEqual(len(sent), 3)
        done = self.gw.factory.drain(window=1, timeout=5)
        self.push(d, 1)  # stored (the factory alone drains here), not sent: the pump has stopped
        self.assertEqual(frames_of(t.value()), [wire.GoAway(window_ms=1000)])
        self.assertFalse(t.disconnecting, "its acks are on their way")
        self.assertNoResult(done)
        proto.dataReceived(b"".join(wire.NotificationAck(message_id=n.message_id, status=0).encode()
                                    for n in sent[:2]))
        self.lost(proto)  # the device closed after its acks
        self.assertEqual(self.successResultOf(done)["unacked"], 1)
        left = self.successResultOf(self.gw.store.pending(d.id, {TH}, 100, 0))
        self.assertEqual([m.message_id for m in left][:1], [sent[2].message_id])

    def test_timeout_aborts_what_is_left(self):
        d, proto, t = self.device()
        self.push(d, 1)
        done = self.gw.factory.drain(window=1, timeout=3)
        self.gw.clock.advance(2.9)
        self.assertNoResult(done)
        self.assertFalse(t.disconnected)
        self.gw.clock.advance(0.1)
        self.assertTrue(t.disconnected, "aborted")
        self.assertEqual(self.successResultOf(done)["aborted"], 1)

    def test_no_line_and_no_presence_write_per_device(self):
        """17,000 devices took 10.7 s to close: a log line and a presence release each."""
        conns = [self.device() for _ in range(20)]
        releases = []
        self.gw.store.release = lambda *a: releases.append(a) or defer.succeed(None)
        logged = Logged(self)
        self.gw.router.release_all()
        done = self.gw.factory.drain(window=1, timeout=5)
        self.lost(*(p for _, p, _ in conns))
        self.assertEqual(self.successResultOf(done)["told"], 20)
        self.assertEqual(releases, [])
        self.assertEqual(self.successResultOf(self.gw.store.where(conns[0][0].id)), None)
        self.assertEqual(logged.formats(), [])

    def test_without_drain_each_close_is_logged_and_released(self):
        """The counterpart of the test above: it would pass with nothing at all to suppress."""
        d, proto, t = self.device()
        releases = []
        self.gw.store.release = lambda *a: releases.append(a) or defer.succeed(None)
        logged = Logged(self)
        self.lost(proto)
        self.assertEqual(len(releases), 1)
        self.assertEqual(len(logged.events), 1)


class FakeSite:
    def __init__(self):
        self.channels = set()
        self.done = defer.Deferred()

    def drain(self):
        return self.done


class DrainServiceTests(unittest.TestCase):
    """The order: 503 Shutdown from the start, the store closed only after the writes."""

    def setUp(self):
        self.gw = Gateway()
        self.site = FakeSite()
        self.closed = []
        self.gw.store.close = lambda: self.closed.append(self.gw.clock.seconds()) or defer.succeed(None)
        self.drain = Drain(self.gw.router, self.gw.store, self.gw.factory, self.site, self.gw.clock,
                           timeout=5, window=1)

    def test_store_closed_after_outstanding_writes(self):
        gate = defer.Deferred()
        self.gw.store.ack_many = lambda device, mids: gate
        self.gw.router.ack_many("d", [b"m"])
        done = self.drain.drain()
        self.assertTrue(self.gw.router.shutting_down)
        self.site.done.callback(None)
        self.assertEqual(self.closed, [], "an ack still being written")
        self.gw.clock.advance(1)
        gate.callback(1)
        self.gw.clock.advance(0)  # the reactor turn that flushes the closes
        self.successResultOf(done)
        self.assertEqual(self.closed, [self.gw.clock.seconds()])

    def test_bounded_by_the_timeout(self):
        self.gw.store.ack_many = lambda device, mids: defer.Deferred()  # never answered
        self.gw.router.ack_many("d", [b"m"])
        logged = Logged(self)
        started = self.gw.clock.seconds()
        done = self.drain.drain()
        self.gw.clock.advance(4.9)
        self.assertEqual(self.closed, [])
        self.gw.clock.advance(0.1)
        self.gw.clock.advance(0)
        self.successResultOf(done)
        self.assertEqual(self.closed, [started + 5])
        (line,) = [e for e in logged.events if "drained" in (e.get("log_format") or "")]
        self.assertIn("--drain-timeout", line["late"])
        self.assertEqual(line["writes"], 1)

    def test_new_pushes_refused_shutdown(self):
        from pushd.gateway.errors import ShuttingDown

        self.drain.drain()
        token = self.gw.tokens.scoped_token(Device().id, TH)
        f = self.failureResultOf(self.gw.router.accept(token, TOPIC, b"{}", uuid.uuid4(), expiry=2 ** 31))
        f.trap(ShuttingDown)
        self.assertEqual(f.value.reason, "Shutdown")



class ProviderDrainTests(unittest.TestCase):
    """The provider listener's part, over real TLS on loopback."""

    @defer.inlineCallbacks
    def setUp(self):
        yield ServerMixin.setUp(self)

    @defer.inlineCallbacks
    def test_http1_keepalive_connection_closed(self):
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(self.ca_pem)), pool=pool)
        headers = Headers({"authorization": [f"bearer {self.pki.provider_key}"], "apns-topic": [TOPIC]})
        resp = yield agent.request(b"POST", f"{self.url}/3/device/{self.token}".encode(), headers,
                                   FileBodyProducer(BytesIO(b'{"aps":{}}')))
        yield readBody(resp)
        self.assertEqual(resp.code, 200)
        self.assertEqual(len(self.site.channels), 1, "kept alive")
        yield self.site.drain()
        self.assertEqual(self.site.channels, set())

    @defer.inlineCallbacks
    def test_h2_goaway_then_close(self):
        client = yield h2client.connect(self.port.getHost().port, self.ca_pem)
        auth = [("authorization", f"bearer {self.pki.provider_key}"), ("apns-topic", TOPIC)]
        r = yield client.request(f"/3/device/{self.token}", auth, b'{"aps":{}}')
        self.assertEqual(r.status, 200)
        self.router.shutting_down = True
        yield self.site.drain()
        yield client.closed
        self.assertEqual(client.terminated.error_code, 0)  # NO_ERROR: a graceful stop
        self.assertEqual(client.terminated.additional_data, b'{"reason":"Shutdown"}')
