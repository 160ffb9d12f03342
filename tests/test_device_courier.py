from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pushd import tls, wire
from pushd.device.courier import CourierClientFactory, ICourierListener
from pushd.device.transports import TCPTransport, TLSTransport, parse

from .helpers import CA_CERT, Device, frames_of


@implementer(ICourierListener)
class Listener:
    def __init__(self):
        self.events = []

    def connected(self, proto, base_token):
        self.events.append(("connected", base_token))

    def disconnected(self, reason):
        self.events.append(("disconnected",))

    def tokenReceived(self, topic_hash, token):
        self.events.append(("token", topic_hash, token))

    def notificationReceived(self, msg):
        self.events.append(("notification", msg.payload))
        return wire.STATUS_OK

    def keepaliveSent(self):
        self.events.append(("ka",))

    def keepaliveAnswered(self):
        self.events.append(("ka-ack",))


class Highest:
    """An rng at the top of every jitter range, so delays are exact."""

    def uniform(self, a, b):
        return b


class TLSStandIn(StringTransport):
    """A transport that is TLS to the protocol (its handle a pyOpenSSL Connection); the
    test calls handshakeCompleted, as Twisted does once the gateway's certificate verified."""

    def __init__(self):
        super().__init__()
        from OpenSSL import SSL

        self._handle = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)

    def getHandle(self):
        return self._handle


def connect_ack(**kw):
    fields = dict(status=0, token=b"B" * 32, max_message_size=4096, unknown5=b"", capabilities=b"", server_time=1)
    fields.update(kw)
    return wire.ConnectAck(**fields).encode()


class FactoryTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.listener = Listener()
        self.dev = Device()
        self.factory = CourierClientFactory(
            self.listener,
            [TCPTransport("127.0.0.1", 5223), TCPTransport("127.0.0.1", 443)],
            self.dev.key,
            self.dev.der,
            reactor=self.reactor,
            max_delay=30,
            rng=Highest(),
        )
        verifyObject(ICourierListener, self.listener)

    def ports(self):
        return [c[1] for c in self.reactor.tcpClients]

    def fail_last(self):
        self.factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))

    def up(self):
        """Complete the current attempt: protocol built, ConnectAck received."""
        proto = self.factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(connect_ack())
        return proto, t

    def test_first_attempt_goes_to_first_transport(self):
        self.factory.start()
        self.assertEqual(self.ports(), [5223])

    def test_backoff_doubles_to_max_and_rotates(self):
        self.factory.start()
        waits = []
        for _ in range(7):
            self.fail_last()
            (call,) = self.reactor.getDelayedCalls()
            waits.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(waits[-1])
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(self.ports(), [5223, 443, 5223, 443, 5223, 443, 5223, 443])
        self.assertEqual(self.factory.failures, 7)

    def test_jitter_is_full(self):
        import random

        self.factory.rng = random.Random(1)
        self.factory.start()
        self.factory.delay = 16
        self.fail_last()
        (call,) = self.reactor.getDelayedCalls()
        wait = call.getTime() - self.reactor.seconds()
        self.assertTrue(0 <= wait <= 16)
        self.assertNotIn(wait, (0, 16))

    def test_connect_ack_resets_backoff(self):
        self.factory.start()
        for _ in range(3):
            self.fail_last()
            self.reactor.advance(100)
        self.assertEqual(self.factory.delay, 8)
        proto, t = self.up()
        self.assertEqual(self.factory.delay, 1)
        self.assertEqual(self.factory.failures, 0)
        self.assertEqual(self.factory.successes, 1)
        self.assertEqual(self.factory.base_token, b"B" * 32)
        self.assertIn(("connected", b"B" * 32), self.listener.events)

    def test_clock_off_by_more_than_the_nonce_window_connects_on_the_next_attempt(self):
        """A device clock 520 s ahead (a clock jump): the gateway refuses the Connect and
        tells its time; the next Connect is stamped with that time, and verifies."""
        server = 1_800_000_000.0
        self.reactor.advance(server + 520)
        self.factory.start()
        proto = self.factory.buildProtocol(None)
        t = TLSStandIn()
        proto.makeConnection(t)
        proto.handshakeCompleted()
        first = frames_of(t.value())[0]
        with self.assertRaisesRegex(tls.AuthError, "stale nonce"):
            tls.verify_connect(CA_CERT, first.certificate, first.nonce, first.signature, server)
        proto.dataReceived(connect_ack(status=2, server_time=int(server * 1000)))
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))
        self.reactor.advance(1)
        proto = self.factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        second = frames_of(t.value())[0]
        device_id = tls.verify_connect(CA_CERT, second.certificate, second.nonce, second.signature, server + 1)
        self.assertEqual(device_id, self.dev.id)

    def ack_time(self, transport, offset):
        """A refusing ConnectAck carrying a time ``offset`` s from ours, over ``transport``."""
        self.reactor.advance(1_800_000_000.0)
        self.factory.start()
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(transport)
        if isinstance(transport, TLSStandIn):
            proto.handshakeCompleted()
        proto.dataReceived(connect_ack(status=2, server_time=int((self.reactor.seconds() + offset) * 1000)))
        return self.factory.clock_offset

    def test_gateway_time_over_plain_tcp_is_not_believed(self):
        """Item 12: anyone on a plain tcp path could set the device's nonce clock."""
        self.assertEqual(self.ack_time(StringTransport(), 3600), 0.0)

    def test_gateway_time_beyond_a_day_is_not_believed(self):
        self.assertEqual(self.ack_time(TLSStandIn(), 86400 * 3), 0.0)

    def test_gateway_time_over_verified_tls_within_a_day_is_taken(self):
        self.assertAlmostEqual(self.ack_time(TLSStandIn(), -3600), -3600, places=2)

    def test_tcp_connect_alone_does_not_reset(self):
        """A gateway that accepts TCP and then refuses Connect is still backed off from."""
        self.factory.start()
        self.fail_last()
        self.reactor.advance(100)
        proto = self.factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(connect_ack(status=2))
        self.assertTrue(t.disconnecting)
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))
        self.assertEqual(self.factory.failures, 2)
        (call,) = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), 2)

    def test_lost_after_up_retries_same_transport_quickly(self):
        self.factory.start()
        self.fail_last()
        self.reactor.advance(100)  # now on 443
        proto, t = self.up()
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))
        self.assertIn(("disconnected",), self.listener.events)
        (call,) = self.reactor.getDelayedCalls()
        self.assertLessEqual(call.getTime() - self.reactor.seconds(), 1)
        self.reactor.advance(1)
        self.assertEqual(self.ports()[-1], 443)

    def test_stop_leaves_no_delayed_calls(self):
        self.factory.start()
        self.fail_last()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.factory.stop()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_while_connected(self):
        self.factory.start()
        proto, t = self.up()
        self.factory.stop()
        self.assertTrue(t.disconnecting)
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ProtocolTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.listener = Listener()
        self.dev = Device()
        self.factory = CourierClientFactory(
            self.listener, [TCPTransport("127.0.0.1", 5223)], self.dev.key, self.dev.der,
            reactor=self.reactor, keepalive_min=60, keepalive_max=60, keepalive_timeout=15,
        )
        self.proto = self.factory.buildProtocol(None)
        self.t = StringTransport()
        self.proto.makeConnection(self.t)

    def sent(self):
        out = frames_of(self.t.value())
        self.t.clear()
        return out

    def test_connect_proves_identity(self):
        (c,) = self.sent()
        self.assertIsInstance(c, wire.Connect)
        self.assertEqual(
            tls.verify_connect(CA_CERT, c.certificate, c.nonce, c.signature, self.reactor.seconds()), self.dev.id
        )
        self.assertEqual(c.pushd_version, 1)

    def test_no_connect_ack_drops(self):
        self.reactor.advance(15)
        self.assertTrue(self.t.disconnecting)

    def test_keepalive_cycle(self):
        self.proto.dataReceived(connect_ack())
        self.sent()
        self.reactor.advance(60)
        self.assertEqual(self.sent(), [wire.KeepAlive()])
        self.reactor.advance(5)
        self.proto.dataReceived(wire.KeepAliveAck().encode())
        self.assertIn(("ka-ack",), self.listener.events)
        self.reactor.advance(60)
        self.assertEqual(self.sent(), [wire.KeepAlive()])
        self.reactor.advance(14)
        self.assertFalse(self.t.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(self.t.disconnecting, "unanswered keepalive drops the connection")

    def test_gateway_sets_interval(self):
        self.proto.dataReceived(connect_ack(keepalive_interval=20))
        self.sent()
        self.reactor.advance(20)
        self.assertEqual(self.sent(), [wire.KeepAlive()])

    def test_notification_acked(self):
        self.proto.dataReceived(connect_ack())
        self.sent()
        n = wire.Notification(token=b"T" * 32, topic=wire.topic_hash("a"), payload=b"{}", message_id=b"m1")
        self.proto.dataReceived(n.encode())
        (ack,) = self.sent()
        self.assertEqual((ack.message_id, ack.status), (b"m1", 0))
        self.assertIn(("notification", b"{}"), self.listener.events)

    def test_garbage_from_gateway_drops(self):
        self.proto.dataReceived(b"\x08\xff\xff\xff\xff")
        self.assertTrue(self.t.disconnecting)

    def test_connection_lost_cancels_timers(self):
        self.proto.dataReceived(connect_ack())
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class TransportTests(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(parse("tcp:127.0.0.1:5223", b""), TCPTransport("127.0.0.1", 5223))
        t = parse("tls:[::1]:443", b"pem", "push.example")
        self.assertEqual((t.host, t.port, t.tls_name), ("::1", 443, "push.example"))
        self.assertIsInstance(t, TLSTransport)

    def test_parse_errors(self):
        for bad in ("udp:h:1", "tls:h", "tls::5223", "tcp:h:x", "tcp:h:70000"):
            self.assertRaises(ValueError, parse, bad, b"")

    def test_tls_connects_with_connect_ssl(self):
        r = MemoryReactorClock()
        TLSTransport("localhost", 5223, tls.cert_pem(CA_CERT)).connect(r, ClientFactory())
        self.assertEqual(r.sslClients[0][:2], ("localhost", 5223))


class AdaptiveKeepaliveProtocolTests(unittest.TestCase):
    """The interval grows on answered keepalives and falls back after an unanswered one,
    across the reconnect, all on a fake clock."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        dev = Device()
        self.factory = CourierClientFactory(
            Listener(), [TCPTransport("127.0.0.1", 5223)], dev.key, dev.der,
            reactor=self.reactor, keepalive_min=30, keepalive_max=1000, keepalive_timeout=10,
        )
        self.factory.keepalive.growth = 2

    def connect(self, advertised=None):
        proto = self.factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(connect_ack(keepalive_interval=advertised))
        t.clear()
        return proto, t

    def test_grow_fail_fall_back(self):
        proto, t = self.connect(advertised=None)
        waits = []
        for _ in range(4):
            (call,) = [c for c in self.reactor.getDelayedCalls() if c.func == proto.keepalive]
            waits.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(waits[-1])
            self.assertEqual(frames_of(t.value()), [wire.KeepAlive()])
            t.clear()
            proto.dataReceived(wire.KeepAliveAck().encode())
        self.assertEqual(waits, [30, 60, 120, 240], "doubling while answered")
        self.reactor.advance(480)  # the keepalive after 480 s goes out...
        self.reactor.advance(10)  # ...and is not answered
        self.assertTrue(t.disconnecting)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.factory.keepalive.interval, 240, "back to the last answered interval")
        self.assertEqual(self.factory.keepalive.failures, 1)
        proto, t = self.connect(advertised=100)
        self.assertEqual(self.factory.keepalive.interval, 100, "never above what the gateway accepts")


class ReconnectNowTests(unittest.TestCase):
    """SIGHUP / pushctl reconnect: a network change means connect again at once."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        dev = Device()
        self.factory = CourierClientFactory(
            Listener(), [TCPTransport("127.0.0.1", 5223), TCPTransport("127.0.0.1", 443)],
            dev.key, dev.der, reactor=self.reactor, rng=Highest())

    def test_waiting_to_retry_connects_now(self):
        self.factory.start()
        for _ in range(4):
            self.factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            self.reactor.advance(100)
        self.factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        attempts = len(self.reactor.tcpClients)
        self.factory.reconnect_now("test")
        self.assertEqual(len(self.reactor.tcpClients), attempts + 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.factory.delay, 1)

    def test_connected_drops_and_connects_at_once(self):
        self.factory.start()
        proto = self.factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(connect_ack())
        attempts = len(self.reactor.tcpClients)
        self.factory.reconnect_now("test")
        self.assertTrue(t.disconnecting)
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))
        self.assertEqual(len(self.reactor.tcpClients), attempts + 1, "no backoff wait")
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active() and c.func != proto.keepalive], [])


class GoAwayTests(unittest.TestCase):
    """The gateway drains (GoAway): the device reconnects within the announced window, not
    after its backoff."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.listener = Listener()
        dev = Device()
        self.factory = CourierClientFactory(
            self.listener, [TCPTransport("127.0.0.1", 5223), TCPTransport("127.0.0.1", 443)],
            dev.key, dev.der, reactor=self.reactor, max_delay=30, rng=Highest())
        self.factory.start()

    def up(self):
        proto = self.factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(connect_ack(keepalive_interval=60))
        t.clear()
        return proto, t

    def goaway(self, proto, t, data):
        proto.dataReceived(data)
        self.assertTrue(t.disconnecting, "GoAway closes the connection")
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))

    def next_attempt(self):
        """Seconds from now to the next connection attempt."""
        (call,) = [c for c in self.reactor.getDelayedCalls() if c.active()]
        return call.getTime() - self.reactor.seconds()

    def test_reconnects_at_the_top_of_the_window_not_after_backoff(self):
        """The rng at the top of its range: the attempt comes at exactly the window (0.25 s);
        a backoff would wait its delay (1 s after a ConnectAck, more after failures)."""
        proto, t = self.up()
        attempts = len(self.reactor.tcpClients)
        self.goaway(proto, t, wire.GoAway(window_ms=250).encode())
        self.assertEqual(self.next_attempt(), 0.25)
        self.reactor.advance(0.25)
        self.assertEqual(len(self.reactor.tcpClients), attempts + 1)
        self.assertEqual(self.reactor.tcpClients[-1][1], 5223, "the same transport again")
        self.assertEqual(self.factory.delay, 1, "backoff reset: a failed attempt now waits 1 s at most")

    def test_random_waits_stay_in_the_window(self):
        import random

        self.factory.rng = random.Random(7)
        waits = []
        for _ in range(50):
            proto, t = self.up()
            self.goaway(proto, t, wire.GoAway(window_ms=400).encode())
            waits.append(self.next_attempt())
            self.reactor.advance(waits[-1])
        self.assertTrue(all(0 <= w <= 0.4 for w in waits), waits)
        self.assertGreater(len(set(waits)), 40, "spread, not one instant")

    def test_acks_go_out_before_the_close(self):
        """A Notification and the GoAway in one read: the ack is written, then the close."""
        proto, t = self.up()
        n = wire.Notification(token=b"T" * 32, topic=wire.topic_hash("a"), payload=b"{}", message_id=b"m1")
        proto.dataReceived(n.encode() + wire.GoAway(window_ms=100).encode())
        (ack,) = frames_of(t.value())
        self.assertEqual((ack.message_id, ack.status), (b"m1", 0))
        self.assertTrue(t.disconnecting)
        self.assertFalse(t.disconnected, "a graceful close (what was written is flushed), not an abort")

    def test_no_window_field_uses_the_default(self):
        proto, t = self.up()
        self.goaway(proto, t, wire.GoAway().encode())
        self.assertEqual(self.next_attempt(), wire.GOAWAY_DEFAULT_WINDOW_MS / 1000)

    def test_window_bounded_by_max_delay(self):
        proto, t = self.up()
        self.goaway(proto, t, wire.GoAway(window_ms=10 ** 9).encode())
        self.assertEqual(self.next_attempt(), 30)

    def test_a_plain_close_still_backs_off(self):
        """Without a GoAway nothing changes: the next close uses the backoff again."""
        proto, t = self.up()
        self.goaway(proto, t, wire.GoAway(window_ms=100).encode())
        self.reactor.advance(0.1)
        proto, t = self.up()
        self.factory.delay = 8
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))
        self.assertEqual(self.next_attempt(), 8)

    def test_stopped_factory_does_not_reconnect(self):
        proto, t = self.up()
        proto.dataReceived(wire.GoAway(window_ms=100).encode())
        self.factory.stopTrying()
        proto.connectionLost(Failure(ConnectionLost()))
        self.factory.clientConnectionLost(None, Failure(ConnectionLost()))
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])
