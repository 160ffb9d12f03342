"""Pacing before authentication: the reads of connections not yet authenticated (TLS
handshake, then Connect or provider token) are handled at most ``budget`` per reactor turn
per role, the rest paused until later turns; authenticated connections are never paused or
delayed; the waiting queue holds only live connections and leaves no timer behind."""

from pathlib import Path

from twisted.internet import protocol, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial import unittest

from pushd import tls
from pushd.admission import Admission, AdmissionFactory
from pushd.endpoints import LeanTLSFactory


class TurnClock(task.Clock):
    """task.Clock whose ``turn()`` runs only the calls due when it starts, as one reactor
    iteration does (a ``callLater(0)`` made meanwhile waits for the next turn)."""

    def turn(self):
        due = [c for c in self.getDelayedCalls() if c.getTime() <= self.seconds()]
        for c in due:
            if c.active():
                self.calls.remove(c)
                c.called = 1
                c.func(*c.args, **c.kw)


class Handshaking(protocol.Protocol):
    """Stands for TLS and the application: its handshake is done after ``reads`` reads, and
    it is authenticated once it read b"auth" (or at once if ``auth`` is false)."""

    def __init__(self, log, reads=2, auth=False):
        self.log, self.reads, self.got = log, reads, []
        self.authenticated = not auth

    @property
    def handshake_done(self):
        return len(self.got) >= self.reads

    def dataReceived(self, data):
        self.got.append(data)
        self.log.append((self, data))
        if data == b"auth":
            self.authenticated = True


class Inner(protocol.Factory):
    auth = False

    def __init__(self):
        self.log = []  # (protocol, data) in the order handed on

    def buildProtocol(self, addr):
        return Handshaking(self.log, auth=self.auth)


class PacingTests(unittest.TestCase):
    def setUp(self):
        self.clock = TurnClock()
        self.clock.advance(1000)

    def make(self, budget):
        self.adm = Admission("provider", self.clock, max_connections=10_000, max_per_address=10_000,
                             rate=1e9, burst=1e9, preauth_reads_per_turn=budget)
        self.inner = Inner()
        self.factory = AdmissionFactory(self.adm, self.inner)
        self.n = 0

    def open(self):
        self.n += 1
        addr = IPv4Address("TCP", f"10.{self.n // 250}.{self.n % 250}.1", 40000)
        p = self.factory.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        p.makeConnection(t)
        return p, t

    def handed(self):
        return len(self.inner.log)

    def test_a_burst_of_handshakes_is_spread_over_turns(self):
        """600 connections' ClientHellos in one epoll batch took 266 ms of one turn."""
        self.make(budget=4)
        conns = [self.open() for _ in range(10)]
        for i, (p, t) in enumerate(conns):
            p.dataReceived(b"hello %d" % i)
        self.assertEqual(self.handed(), 4, "at most the budget handled in the turn they came in")
        self.assertEqual([t.producerState for _, t in conns], ["producing"] * 4 + ["paused"] * 6)
        self.clock.turn()
        self.assertEqual(self.handed(), 8)
        self.assertEqual([t.producerState for _, t in conns], ["producing"] * 8 + ["paused"] * 2)
        self.clock.turn()
        self.assertEqual(self.handed(), 10)
        self.assertEqual([d for _, d in self.inner.log], [b"hello %d" % i for i in range(10)], "in order, whole")
        self.assertEqual([t.producerState for _, t in conns], ["producing"] * 10)
        self.assertEqual(self.adm.pacer.deferred, 6)
        self.clock.turn()  # a turn that used nothing: no timer left
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_connections_go_before_new_ones(self):
        self.make(budget=2)
        first = [self.open() for _ in range(4)]
        for p, _ in first:
            p.dataReceived(b"early")
        self.clock.turn()  # the two waiting ones take this turn's budget
        late, lt = self.open()
        late.dataReceived(b"late")
        self.assertEqual(lt.producerState, "paused")
        self.assertEqual([d for _, d in self.inner.log], [b"early"] * 4)
        self.clock.turn()
        self.assertEqual([d for _, d in self.inner.log], [b"early"] * 4 + [b"late"])

    def test_established_connections_are_never_paused(self):
        self.make(budget=1)
        (est, et) = self.open()
        est.dataReceived(b"hello")
        self.clock.turn()
        est.dataReceived(b"finished")  # handshake done after this one
        self.clock.turn()
        self.clock.turn()
        burst = [self.open() for _ in range(20)]
        for p, _ in burst:
            p.dataReceived(b"hello")
        # Budget spent and 19 waiting: an established connection's read goes straight in.
        for i in range(5):
            est.dataReceived(b"push %d" % i)
            self.assertEqual(self.inner.log[-1], (est.wrappedProtocol, b"push %d" % i))
        self.assertEqual(et.producerState, "producing")

    def test_handshake_reads_are_paced_until_done(self):
        """Not only the first read: a TLS 1.2 client's key exchange costs the server too."""
        self.make(budget=1)
        a, at = self.open()
        b, bt = self.open()
        a.dataReceived(b"a hello")
        b.dataReceived(b"b hello")
        self.assertEqual(bt.producerState, "paused")
        self.clock.turn()  # b's hello
        a.dataReceived(b"a finished")  # budget spent by b: waits
        self.assertEqual(at.producerState, "paused")
        self.clock.turn()
        self.assertEqual([d for _, d in self.inner.log], [b"a hello", b"b hello", b"a finished"])

    def test_paced_until_authenticated(self):
        """Past its handshake a connection with no valid token yet is still paced: 600 of them
        sending their PINGs together made one turn of 173 ms."""
        self.make(budget=1)
        self.inner.auth = True
        (a, at), (b, bt) = self.open(), self.open()
        for d in (b"hello", b"finished"):  # through the handshake, one turn each
            a.dataReceived(d)
            self.clock.turn()
            b.dataReceived(d)
            self.clock.turn()
            self.clock.turn()
        a.dataReceived(b"ping")
        b.dataReceived(b"ping")
        self.assertEqual(bt.producerState, "paused", "handshake done, not authenticated: paced")
        self.clock.turn()
        a.dataReceived(b"auth")
        self.clock.turn()
        self.clock.turn()
        self.assertEqual(self.inner.log[-1][1], b"auth")
        b.dataReceived(b"ping")  # uses this turn's budget
        for i in range(3):
            a.dataReceived(b"push %d" % i)
            self.assertEqual(self.inner.log[-1], (a.wrappedProtocol, b"push %d" % i), "authenticated: not paced")
        self.assertEqual(at.producerState, "producing")

    def test_reads_are_small_until_authenticated(self):
        """A waiting connection keeps one read: 16 KiB reads, not the reactor's 64 KiB, until
        authenticated (waiting HTTP/2 body floods held 87 KiB per connection)."""
        self.make(budget=4)
        self.inner.auth = True
        p = self.factory.buildProtocol(IPv4Address("TCP", "10.9.9.9", 40000))
        t = StringTransport()
        t.bufferSize = 65536
        p.makeConnection(t)
        self.assertEqual(t.bufferSize, 16384)
        for d in (b"hello", b"finished", b"request"):
            p.dataReceived(d)
        self.assertEqual(t.bufferSize, 16384, "not authenticated yet")
        p.dataReceived(b"auth")
        self.assertEqual(t.bufferSize, 65536)

    def test_a_connection_closed_while_waiting_is_skipped(self):
        """E.g. its absolute connect deadline passed: closed as any other, its held read
        freed and never handed on, and it does not use a turn's budget."""
        self.make(budget=1)
        conns = [self.open() for _ in range(4)]
        for p, _ in conns:
            p.dataReceived(b"hello")
        conns[1][0].connectionLost(None)
        conns[2][0].connectionLost(None)
        self.clock.turn()
        self.assertEqual(self.handed(), 2)
        self.assertEqual(self.inner.log[-1][0], conns[3][0].wrappedProtocol)
        self.assertEqual(self.adm.live, 2)

    def test_inner_pause_is_kept(self):
        """The inner protocol's own pause (write back-pressure) is not undone by the pacer,
        and its resume does not start a waiting connection's reads early."""
        self.make(budget=1)
        self.open()[0].dataReceived(b"hello")
        p, t = self.open()
        p.dataReceived(b"hello")
        p.resumeProducing()
        self.assertEqual(t.producerState, "paused", "still waiting for its turn")
        p.pauseProducing()
        self.clock.turn()
        self.assertEqual(self.handed(), 2)
        self.assertEqual(t.producerState, "paused", "the inner protocol paused it")
        p.resumeProducing()
        self.assertEqual(t.producerState, "producing")

    def test_budget_zero_does_not_pace(self):
        self.make(budget=0)
        for _ in range(50):
            p, t = self.open()
            p.dataReceived(b"hello")
            self.assertEqual(t.producerState, "producing")
        self.assertEqual(self.handed(), 50)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopping_the_role_leaves_no_timer(self):
        self.make(budget=1)
        self.factory.doStart()
        for _ in range(3):
            self.open()[0].dataReceived(b"hello")
        self.factory.doStop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Collect(protocol.Protocol):
    def connectionMade(self):
        self.got = b""

    def dataReceived(self, data):
        self.got += data


class TLSPacingTests(unittest.TestCase):
    """Over real TLS (iosim): the LeanTLS protocol tells admission when its handshake is
    done; from then on the connection's reads are not paced."""

    def test_real_handshake_then_unpaced(self):
        pki = tls.load_or_create_pki(Path(self.mktemp()), ["localhost"])
        clock = TurnClock()
        adm = Admission("courier", clock, max_connections=10, max_per_address=10, rate=1e9, burst=1e9,
                        preauth_reads_per_turn=1)
        server_tls = LeanTLSFactory(pki.server_options(tls.COURIER_ALPN), False,
                                    protocol.Factory.forProtocol(_Collect), clock=task.Clock())
        factory = AdmissionFactory(adm, server_tls)
        client_factory = TLSMemoryBIOFactory(
            tls.client_options("localhost", tls.cert_pem(pki.ca_cert), tls.COURIER_ALPN), True,
            protocol.Factory.forProtocol(_Collect), clock=task.Clock())
        server = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        client = client_factory.buildProtocol(None)
        client.write = client._aggregator._write  # write-through (as tests/test_perf_courier.py)
        self.assertTrue(server._pacing)
        _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client, greet=True)
        server.wrappedProtocol.write = server.wrappedProtocol._aggregator._write
        for _ in range(4):
            clock.turn()
            pump.flush()
        self.assertTrue(server.wrappedProtocol.handshake_done)
        self.assertFalse(server._pacing, "handshake done: no longer paced")
        client.write(b"ping")
        pump.flush()
        self.assertEqual(server.wrappedProtocol.wrappedProtocol.got, b"ping")


class ApplicationProtocolsTests(unittest.TestCase):
    """The pacer stops at ``authenticated``: the courier's says so once a Connect is
    verified, the provider's once a valid token came (HTTP/1.1 or HTTP/2 behind the sniffer)."""

    def test_courier(self):
        from pushd.gateway.courier import CourierServerProtocol

        from types import SimpleNamespace

        p = CourierServerProtocol()
        self.assertFalse(p.authenticated)
        p.session = SimpleNamespace(device_id="device-1")  # what a verified Connect makes
        self.assertTrue(p.authenticated)

    def test_provider_sniffer_asks_its_channel(self):
        from types import SimpleNamespace

        from pushd.gateway.provider.http1 import PrefaceSniffingChannel

        p = PrefaceSniffingChannel.__new__(PrefaceSniffingChannel)
        p._channel = SimpleNamespace(authenticated=False)
        self.assertFalse(p.authenticated)
        p._channel.authenticated = True
        self.assertTrue(p.authenticated)
