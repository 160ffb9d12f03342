"""Admission control: caps in total and per source, a rate per source, decided before any
TLS work; refusals counted and logged at most once a second; the source table bounded."""

from twisted.internet import defer, protocol, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pushd.admission import (
    PER_ADDRESS, RATE, TOTAL, Admission, AdmissionFactory, RefusedProtocol, address_key, fit_fd_limit,
)


def v4(host, port=40000):
    return IPv4Address("TCP", host, port)


def v6(host, port=40000):
    return IPv6Address("TCP", host, port)


class Inner(protocol.Factory):
    """Stands for the TLS factory: counts the protocols it had to build."""

    def __init__(self):
        self.built = 0
        self.received = []

    def buildProtocol(self, addr):
        self.built += 1
        p = protocol.Protocol()
        p.dataReceived = self.received.append
        return p


class AdmissionTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)

    def make(self, **kw):
        args = dict(max_connections=1000, max_per_address=1000, rate=1000.0, burst=1000.0)
        args.update(kw)
        self.adm = Admission("courier", self.clock, **args)
        self.inner = Inner()
        self.factory = AdmissionFactory(self.adm, self.inner)
        return self.factory

    def open(self, addr):
        """Accept a connection from ``addr``: its (wrapper, transport), or None if refused."""
        p = self.factory.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        p.makeConnection(t)
        if isinstance(p, RefusedProtocol):
            self.assertTrue(t.disconnected, "a refused connection is aborted at once")
            return None
        return p, t

    def close(self, conn):
        conn[0].connectionLost(None)

    def test_total_cap(self):
        self.make(max_connections=3)
        conns = [self.open(v4(f"10.0.0.{i}")) for i in range(3)]
        self.assertNotIn(None, conns)
        self.assertIsNone(self.open(v4("10.0.0.9")))
        self.assertEqual(self.inner.built, 3, "refused before the inner (TLS) factory is asked")
        self.assertEqual(self.adm.refused[TOTAL], 1)
        self.close(conns[0])
        self.assertIsNotNone(self.open(v4("10.0.0.9")))
        self.assertEqual(self.adm.live, 3)

    def test_ended_connections_trim_the_heap(self):
        """After a burst of connections ends, its freed pages go back to the OS (HeapTrimmer)."""
        from pushd.gateway.heap import HeapTrimmer

        trims = []
        self.make(heap=HeapTrimmer(self.clock, delay=1.0, trim=trims.append))
        conns = [self.open(v4(f"10.0.0.{i}")) for i in range(3)]
        for c in conns:
            self.close(c)
        self.clock.advance(1.0)
        self.assertEqual(trims, [0])
        self.adm.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_total_cap_holds_under_an_accept_flood(self):
        self.make(max_connections=50, max_per_address=10_000, rate=1e9, burst=1e9)
        opened = [self.open(v4("10.0.0.1", 1000 + i)) for i in range(5000)]
        self.assertEqual(sum(c is not None for c in opened), 50)
        self.assertEqual(self.adm.refused[TOTAL], 4950)
        self.assertEqual(self.inner.built, 50)

    def test_per_address_cap(self):
        self.make(max_per_address=2)
        a = [self.open(v4("192.0.2.1", p)) for p in (1, 2, 3)]
        self.assertIsNone(a[2])
        self.assertIsNotNone(self.open(v4("192.0.2.2")), "another address is not affected")
        self.assertEqual(self.adm.refused[PER_ADDRESS], 1)
        self.close(a[0])
        self.assertIsNotNone(self.open(v4("192.0.2.1", 4)))

    def test_rate_per_address(self):
        self.make(rate=2.0, burst=5.0)
        addr = v4("198.51.100.7")
        ok = 0
        for _ in range(8):
            c = self.open(addr)
            if c is not None:
                ok += 1
                self.close(c)  # not held: only the rate counts
        self.assertEqual(ok, 5, "the burst")
        self.assertEqual(self.adm.refused[RATE], 3)
        self.assertIsNotNone(self.open(v4("198.51.100.8")), "another address has its own bucket")
        self.clock.advance(0.5)
        self.assertIsNotNone(self.open(addr), "one token back after 1/rate s")
        self.assertIsNone(self.open(addr))

    def test_ipv6_counts_per_prefix_and_mapped_ipv4_as_ipv4(self):
        self.make(max_per_address=2)
        self.assertIsNotNone(self.open(v6("2001:db8:1:2::1")))
        self.assertIsNotNone(self.open(v6("2001:db8:1:2:ffff::9")))
        self.assertIsNone(self.open(v6("2001:db8:1:2::abcd")), "same /64")
        self.assertIsNotNone(self.open(v6("2001:db8:1:3::1")), "another /64")
        self.assertIsNotNone(self.open(v4("192.0.2.5")))
        self.assertIsNotNone(self.open(v6("::ffff:192.0.2.5")))
        self.assertIsNone(self.open(v6("::ffff:192.0.2.5")), "mapped IPv4 is the IPv4 address")
        self.assertEqual(address_key(v6("fe80::1%eth0"), 64), address_key(v6("fe80::2"), 64))
        self.assertNotEqual(address_key(v6("2001:db8::1"), 128), address_key(v6("2001:db8::2"), 128))
        self.assertIsNone(address_key(UNIXAddress("/tmp/s")))

    def test_unix_sources_get_the_total_cap_only(self):
        self.make(max_connections=3, max_per_address=1)
        conns = [self.open(UNIXAddress(None)) for _ in range(4)]
        self.assertEqual([c is not None for c in conns], [True, True, True, False])
        self.close(conns[0])
        self.assertEqual(self.adm.live, 2)

    def test_wrapper_passes_bytes_and_releases_once(self):
        self.make(max_connections=1)
        p, t = self.open(v4("192.0.2.1"))
        p.dataReceived(b"hello")
        self.assertEqual(self.inner.received, [b"hello"])
        p.connectionLost(None)
        self.assertEqual(self.adm.live, 0)
        self.assertEqual(len(self.adm._active), 0)

    def test_table_forgets_full_buckets_and_is_capped(self):
        self.make(rate=10.0, burst=20.0, max_addresses=100)
        for i in range(1000):
            self.close(self.open(v4(f"10.{i // 250}.{i % 250}.1")))
        self.assertLessEqual(len(self.adm), 100, "hard cap on remembered sources")
        self.clock.advance(2.0)  # every bucket full again (20 tokens at 10/s)
        self.close(self.open(v4("10.99.0.1")))
        self.assertEqual(len(self.adm), 1, "sources with a full bucket and nothing live are dropped")
        held = [self.open(v4(f"10.50.0.{i}")) for i in range(10)]
        self.clock.advance(100)
        self.close(self.open(v4("10.99.0.2")))
        self.assertEqual(len(self.adm._active), 10, "live sources are kept")
        for c in held:
            self.close(c)
        self.assertEqual(self.adm.live, 0)

    def test_refusals_logged_at_most_once_a_second(self):
        lines = []

        def observe(event):
            if "refused {total}" in (event.get("log_format") or ""):
                lines.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.make(max_per_address=1)
        self.open(v4("203.0.113.1"))
        for i in range(300):
            self.assertIsNone(self.open(v4("203.0.113.1", 2000 + i)))
            self.clock.advance(0.01)  # 3 s of refusals
        self.clock.advance(1)
        totals = [e["total"] for e in lines]
        self.assertEqual(len(totals), 4, totals)  # at once, then one line a second
        self.assertEqual((totals[0], sum(totals)), (1, 300))
        self.assertLessEqual(max(totals), 101)  # 100 a second, give or take a float tick
        self.assertEqual(set(lines[1]["counts"]), {PER_ADDRESS})
        self.assertEqual(lines[-1]["peer"], "203.0.113.1")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_last_listener_stopping_leaves_no_timer(self):
        f = self.make(max_connections=1)
        other = AdmissionFactory(self.adm, Inner())
        f.doStart()
        other.doStart()
        self.open(v4("192.0.2.1"))
        self.open(v4("192.0.2.2"))
        self.open(v4("192.0.2.3"))  # first refusal: logged at once; this one pending
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        f.doStop()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1, "another listener of the role runs")
        other.doStop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_log_prefix_is_the_inner_factorys(self):
        self.make()
        self.assertEqual(self.factory.logPrefix(), "Inner")


class FakeResource:
    """The process's fd limits, in a unit test of fit_fd_limit (a real process cannot raise
    its hard limit back once lowered)."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard):
        self.limits = (soft, hard)

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        if limits[1] != self.limits[1] or limits[0] > limits[1] != self.RLIM_INFINITY:
            raise ValueError("not allowed")
        self.limits = limits


class FdLimitTests(unittest.TestCase):
    def test_caps_shrink_under_a_low_hard_limit(self):
        r = FakeResource(1024, 1024)
        fitted = fit_fd_limit({"courier": 18000, "provider": 1000}, reserve=256, resource=r)
        self.assertLessEqual(sum(fitted.values()) + 256, 1024)
        self.assertGreater(fitted["courier"], fitted["provider"])

    def test_caps_that_fit_are_kept(self):
        r = FakeResource(20000, 20000)
        self.assertEqual(fit_fd_limit({"courier": 18000, "provider": 1000}, resource=r),
                         {"courier": 18000, "provider": 1000})

    def test_soft_limit_raised_when_the_hard_one_allows(self):
        r = FakeResource(1024, 524288)
        self.assertEqual(fit_fd_limit({"courier": 18000, "provider": 1000}, reserve=256, resource=r),
                         {"courier": 18000, "provider": 1000})
        self.assertEqual(r.limits, (19256, 524288))
        r = FakeResource(1024, r.RLIM_INFINITY)
        fit_fd_limit({"courier": 100}, reserve=100, resource=r)
        self.assertEqual(r.limits, (1024, r.RLIM_INFINITY), "already enough")


class GatewayWiringTests(unittest.TestCase):
    """Every courier and provider listener of a gateway is admission-controlled, outside TLS,
    with the options' limits; one Admission per role, shared by its listeners."""

    def test_listeners_wrapped(self):
        from twisted.internet import reactor

        from pushd.endpoints import LeanTLSFactory
        from pushd.gateway import tap

        o = tap.Options()
        o.parseOptions(["--state-dir", self.mktemp(), "--store", "memory",
                        "--courier", "tls:tcp:0:interface=127.0.0.1", "--courier", "tls:tcp:0:interface=127.0.0.1",
                        "--provider", "tls:tcp:0:interface=127.0.0.1",
                        "--max-per-address", "7", "--provider-max-per-address", "5", "--connect-rate", "3",
                        "--max-connections", "900", "--provider-max-connections", "90",
                        "--preauth-reads-per-turn", "3"])
        top = tap.makeService(o, reactor)
        factories = [svc.factory for svc in top if hasattr(svc, "endpoint")]
        self.assertEqual(len(factories), 3)
        for f in factories:
            self.assertIsInstance(f, AdmissionFactory)
            self.assertIsInstance(f.wrappedFactory, LeanTLSFactory)
        courier = {id(f.admission): f.admission for f in factories[:2]}
        self.assertEqual(len(courier), 1, "one Admission for all courier listeners")
        (c,) = courier.values()
        p = factories[2].admission
        self.assertEqual((c.name, c.max_connections, c.max_per_address, c.rate), ("courier", 900, 7, 3.0))
        self.assertEqual((p.name, p.max_connections, p.max_per_address), ("provider", 90, 5))
        self.assertEqual((c.pacer.budget, p.pacer.budget), (3, 3))
        self.assertIsNot(c.pacer, p.pacer, "one pacer per role")
        self.assertIsNotNone(p.heap, "the provider's connections trim the heap (the courier's factory does its own)")


class Recorder(protocol.Protocol):
    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


class HAProxyListenerTests(unittest.TestCase):
    """haproxy: endpoints wrap whatever admission builds: a refusal must be a protocol
    (None gave an AttributeError traceback per refused connection, which stayed open)."""

    timeout = 10

    @defer.inlineCallbacks
    def test_refused_connection_closed_without_a_traceback(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from pushd.endpoints import listener

        adm = Admission("courier", reactor, max_connections=0, max_per_address=1, rate=1.0, burst=1.0)
        svc = listener(reactor, "haproxy:tcp:0:interface=127.0.0.1", protocol.Factory.forProtocol(protocol.Protocol),
                       None, admission=adm)
        svc.startService()
        port = yield svc._waitingForPort
        self.addCleanup(port.stopListening)
        client = Recorder()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        yield client.lost
        self.assertEqual(adm.refused[TOTAL], 1)
        # A traceback logged by the reactor would also fail this test (trial's logged errors).
        self.assertEqual(self.flushLoggedErrors(), [])
