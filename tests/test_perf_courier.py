"""The courier's lean paths: one timer for all silence deadlines, lazily made containers,
batched fan-out writes, the fast Notification encoder, fresh TLS BIOs after the handshake,
and the heap trim after connection bursts."""

import uuid
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import protocol, task
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial import unittest

from pushd import tls, wire
from pushd.endpoints import LeanTLSFactory, renew_bios
from pushd.gateway.deadlines import DeadlineWheel
from pushd.gateway.heap import HeapTrimmer

from .helpers import Device, Gateway, frames_of

TOPIC = "com.example.app"
TH = wire.topic_hash(TOPIC)


class CountingTransport(StringTransport):
    writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


class DeadlineTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway(keepalive_interval=60, grace=3.0)

    def test_one_timer_for_many_connections(self):
        conns = [self.gw.connection() for _ in range(50)]
        self.assertEqual(len(self.gw.clock.getDelayedCalls()), 1)
        self.gw.clock.advance(31)
        self.assertTrue(all(t.disconnecting for _, t in conns))

    def test_silent_connection_closed_and_no_timer_left(self):
        proto, t, _ = self.gw.connected(Device())
        self.gw.clock.advance(179)
        self.assertFalse(t.disconnecting)
        self.gw.clock.advance(2)
        self.assertTrue(t.disconnecting, "silent for keepalive x grace: closed")
        proto.connectionLost(None)
        self.assertEqual(self.gw.clock.getDelayedCalls(), [])

    def test_reads_move_the_deadline_without_touching_the_timer(self):
        proto, t, _ = self.gw.connected(Device())
        (call,) = self.gw.clock.getDelayedCalls()
        due = call.getTime()
        for _ in range(5):
            self.gw.clock.advance(100)
            proto.dataReceived(wire.KeepAlive().encode())
            self.assertFalse(t.disconnecting)
        self.assertLessEqual(len(self.gw.clock.getDelayedCalls()), 1)
        self.assertGreater(self.gw.clock.getDelayedCalls()[0].getTime(), due)
        self.gw.clock.advance(181)
        self.assertTrue(t.disconnecting)

    def test_closed_connections_leave_no_timer(self):
        conns = [self.gw.connected(Device()) for _ in range(3)]
        for proto, t, _ in conns:
            proto.connectionLost(None)
        self.assertEqual(self.gw.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.gw.factory.deadlines), 0)

    def test_stop_factory_cancels(self):
        self.gw.connection()
        self.gw.factory.stopFactory()
        self.assertEqual(self.gw.clock.getDelayedCalls(), [])

    def test_wheel_never_fires_early(self):
        clock = task.Clock()
        clock.advance(0.3)
        wheel = DeadlineWheel(clock, resolution=0.7)
        fired = []

        class M:
            _wheelslot = None

            def __init__(self, deadline):
                self._deadline = deadline

            def timeoutConnection(self):
                fired.append((self, clock.seconds()))

        members = [M(d) for d in (1.0, 2.1, 2.1000001, 5.0)]
        for m in members:
            wheel.watch(m)
        members[3]._deadline = 9.9  # moved without telling the wheel
        clock.pump([0.05] * 300)
        self.assertEqual(sorted(map(id, (m for m, _ in fired))), sorted(map(id, members)))
        deadlines = dict(zip(map(id, members), (1.0, 2.1, 2.1000001, 9.9)))
        for m, when in fired:
            self.assertGreaterEqual(when, deadlines[id(m)])
            self.assertLess(when, deadlines[id(m)] + 0.7 + 0.05 + 1e-9)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_burst_of_timeouts_is_spread_over_reactor_turns(self):
        """Thousands of connections due together are closed ``batch`` a turn, not in one call
        that stalls every honest connection behind it."""
        clock = task.Clock()
        wheel = DeadlineWheel(clock)
        wheel.batch = 100
        fired = []

        class M:
            _wheelslot = None

            def __init__(self, deadline):
                self._deadline = deadline

            def timeoutConnection(self):
                fired.append(self)

        members = [M(10.0) for _ in range(250)]
        for m in members:
            wheel.watch(m)
        members[-1]._deadline = None  # closed (unwatched by hand) before its turn
        clock.rightNow = 10.0
        wheel._due()  # what the wheel's timer runs: one reactor turn
        self.assertEqual(len(fired), 100)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls() if c.func == wheel._drain], [10.0])
        moved = next(m for m in members[:-1] if m not in fired)  # (a bucket is a set: any order)
        moved._deadline = 30.0  # moved on while waiting: filed again, not timed out
        clock.advance(0)  # the next turns (task.Clock runs them all at once)
        self.assertEqual(len(fired), 248)
        self.assertNotIn(moved, fired)
        self.assertEqual(len(wheel), 1)
        clock.advance(20.0)
        self.assertIn(moved, fired)
        self.assertEqual(clock.getDelayedCalls(), [])


class LazyStateTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway(window=3)
        self.dev = Device()
        self.proto, self.t, _ = self.gw.connected(self.dev)
        self.token = self.gw.tokens.scoped_token(self.dev.id, TH)

    def push(self, n=1):
        for i in range(n):
            self.successResultOf(self.gw.router.accept(
                self.token, TOPIC, b'{"n":%d}' % i, uuid.uuid4(), expiry=int(self.gw.clock.seconds()) + 3600))

    def test_idle_connection_has_no_dict_and_shares_empty_containers(self):
        other, _, _ = self.gw.connected(Device())
        self.assertFalse(hasattr(self.proto, "__dict__") and self.proto.__dict__)
        self.assertFalse(hasattr(self.proto.session, "__dict__"))
        self.assertIs(self.proto.session.inflight, other.session.inflight)
        self.assertIs(self.proto.session.declined, other.session.declined)
        self.assertIs(self.proto.session.topics, other.session.topics)
        self.assertEqual(len(self.proto.session.inflight), 0)

    def test_no_session_before_connect(self):
        """An unauthenticated connection has no delivery state at all."""
        proto, _ = self.gw.connection()
        self.assertIsNone(proto.session)
        self.assertFalse(hasattr(proto, "__dict__") and proto.__dict__)

    def test_containers_return_to_shared_empties(self):
        session = self.proto.session
        empty = session.inflight
        self.proto.dataReceived(wire.Filter(token=b"x", enabled=[TH]).encode())
        self.push(2)
        sent = frames_of(self.t.value())
        self.t.clear()
        self.assertEqual(len(session.inflight), 2)
        self.proto.dataReceived(b"".join(
            wire.NotificationAck(message_id=m.message_id, status=0).encode() for m in sent))
        self.assertIs(session.inflight, empty)
        self.assertIsNone(session._acked)

    def test_backlog_goes_out_in_one_write(self):
        self.push(3)
        t = CountingTransport()
        proto, _ = self.gw.factory.buildProtocol(None), None
        proto.makeConnection(t)
        proto.dataReceived(self.dev.connect(self.gw.clock.seconds()).encode())
        t.clear()
        t.writes = 0
        proto.dataReceived(wire.Filter(token=b"x", enabled=[TH]).encode())
        self.assertEqual(t.writes, 1)
        self.assertEqual([type(m) for m in frames_of(t.value())], [wire.Notification] * 3)


class EncodeNotificationTests(unittest.TestCase):
    def test_same_bytes_as_the_message(self):
        cases = [
            dict(token=b"t" * 32, topic=b"h" * 20, payload=b"{}", message_id=b"m" * 16,
                 expiry=1234, timestamp=10**18, priority=10),
            dict(token=b"t" * 32, topic=b"h" * 20, payload=b"x" * 4096, message_id=b"\x00" * 4,
                 expiry=None, timestamp=0, priority=None),
            dict(token=b"", topic=b"", payload=b"", message_id=b"", expiry=0, timestamp=None, priority=5),
        ]
        for c in cases:
            self.assertEqual(wire.encode_notification(**c), wire.Notification(**c).encode())

    def test_field_too_long(self):
        with self.assertRaises(wire.WireError):
            wire.encode_notification(b"t", b"h", b"x" * 70000, b"m")


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Collect(protocol.Protocol):
    def connectionMade(self):
        self.got = b""

    def dataReceived(self, data):
        self.got += data


class LeanTLSTests(unittest.TestCase):
    def setUp(self):
        self.pki = tls.load_or_create_pki(Path(self.mktemp()), ["localhost"])

    def connected(self, server_protocol):
        """A LeanTLS server and a TLS client, handshake done, over iosim."""
        server_factory = LeanTLSFactory(
            self.pki.server_options(tls.COURIER_ALPN), False, protocol.Factory.forProtocol(server_protocol),
            clock=task.Clock())
        client_factory = TLSMemoryBIOFactory(
            tls.client_options("localhost", tls.cert_pem(self.pki.ca_cert), tls.COURIER_ALPN), True,
            protocol.Factory.forProtocol(_Collect), clock=task.Clock())
        server = server_factory.buildProtocol(None)
        client = client_factory.buildProtocol(None)
        # BufferingTLSTransport flushes writes on its clock; a write-through client keeps it simple.
        client.write = client._aggregator._write
        server.write = server._aggregator._write
        _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client, greet=True)
        return server, client, pump

    def test_bios_renewed_after_handshake_and_traffic_flows(self):
        server, client, pump = self.connected(_Echo)
        self.assertTrue(server._biosRenewed)
        for i in range(3):
            client.write(b"ping %d " % i * 300)
            pump.flush()
        self.assertEqual(client.wrappedProtocol.got, b"".join(b"ping %d " % i * 300 for i in range(3)))

    def test_bios_renewed_after_a_large_read(self):
        """A BIO keeps the capacity of the largest chunk written to it: after a large read the
        connection gets fresh ones (an HTTP/2 body flood left ~64 KiB per connection: 104 -> 60
        KiB per unauthenticated connection in bench/abuse.py); small reads keep theirs."""
        server, client, pump = self.connected(_Collect)
        bio = server._tlsConnection._into_ssl
        client.write(b"small")
        pump.flush()
        self.assertEqual(server._tlsConnection._into_ssl, bio)
        client.write(b"x" * 64 * 1024)
        pump.flush()
        self.assertNotEqual(server._tlsConnection._into_ssl, bio)
        self.assertEqual(server.wrappedProtocol.got, b"small" + b"x" * 64 * 1024)

    def test_not_renewed_while_bytes_are_pending(self):
        ctx = self.pki.server_options(tls.COURIER_ALPN)
        conn = SSL.Connection(ctx.getContext(), None)
        conn.set_accept_state()
        conn.bio_write(b"\x16\x03\x01")  # a partial record still waiting in the BIO
        self.assertFalse(renew_bios(conn))
        fresh = SSL.Connection(ctx.getContext(), None)
        self.assertTrue(renew_bios(fresh))


class HeapTrimmerTests(unittest.TestCase):
    def test_trims_once_after_the_burst(self):
        clock = task.Clock()
        calls = []
        heap = HeapTrimmer(clock, delay=1.0, trim=calls.append)
        for _ in range(10):
            heap.poke()
            clock.advance(0.5)
        self.assertEqual(calls, [])
        clock.advance(1.0)
        self.assertEqual(calls, [0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_cancels(self):
        clock = task.Clock()
        heap = HeapTrimmer(clock, trim=lambda pad: 1)
        heap.poke()
        heap.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_listening_factory_pokes(self):
        gw = Gateway()
        gw.factory.doStart()
        self.addCleanup(gw.factory.doStop)
        calls = []
        gw.factory.heap.trim = calls.append
        proto, t = gw.connection()
        proto.connectionLost(None)
        gw.clock.advance(2)
        self.assertEqual(calls, [0])


class FakeGC:
    def __init__(self):
        self.calls = []
        self.count = 0

    def collect(self):
        self.calls.append("collect")

    def freeze(self):
        self.calls.append("freeze")
        self.count = 1234

    def get_freeze_count(self):
        return self.count

    def unfreeze(self):
        self.calls.append("unfreeze")
        self.count = 0


class FrozenStartupTests(unittest.TestCase):
    """A gateway's start-up heap is frozen once it runs, so full collections skip it (one
    took 86-87 ms during an HTTP/2 flood, 25-37 ms of it the start-up heap)."""

    def test_frozen_after_start_and_thawed_on_stop(self):
        from pushd.gateway.heap import FrozenStartup

        clock, fake = task.Clock(), FakeGC()
        svc = FrozenStartup(clock, gc=fake)
        svc.startService()
        self.assertEqual(fake.calls, [], "not before the reactor runs")
        clock.advance(0)
        self.assertEqual(fake.calls, ["collect", "freeze"])
        self.assertEqual(svc.frozen, 1234)
        svc.stopService()
        self.assertEqual(fake.calls[-1], "unfreeze")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_gateway_has_one(self):
        from twisted.internet import reactor

        from pushd.gateway import tap
        from pushd.gateway.heap import FrozenStartup

        o = tap.Options()
        o.parseOptions(["--state-dir", self.mktemp(), "--store", "memory", "--courier", "tcp:0:interface=127.0.0.1"])
        top = tap.makeService(o, reactor)
        self.assertEqual(sum(isinstance(s, FrozenStartup) for s in top), 1)
