"""
The Connect proof (pushd/gateway/connect.py) apart from the framing, and what the courier
bounds around it: connections not yet past Connect, bytes held while a Connect is verified,
a close that does not finish, one device's share of the replay cache.
"""

from pathlib import Path

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from pushd import tls, wire
from pushd.gateway.connect import ConnectRefused, ConnectVerifier
from pushd.gateway.courier import ABORT_AFTER
from pushd.gateway.registry import DeviceRegistry
from pushd.gateway.replay import MemoryReplayCache, TooManyNonces

from .helpers import CA_CERT, OTHER_CA_KEY, OTHER_CA_CERT, Device, Gateway, frames_of
from .test_connect_binding import LogCapture, SlowCache, bound_connect

TH = wire.topic_hash("com.example.app")


class VerifierTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway()
        self.clock = self.gw.clock
        self.verifier = ConnectVerifier(CA_CERT, self.clock, self.gw.router,
                                        MemoryReplayCache(100, self.clock, per_owner=2))

    def verify(self, msg, transport=None):
        return self.verifier.verify(msg, transport or StringTransport())

    def refused(self, msg, transport=None):
        return self.failureResultOf(self.verify(msg, transport), ConnectRefused).value.reason

    def test_nonce_only_connect_proves_its_device_once(self):
        d = Device()
        c = d.connect(self.clock.seconds())
        self.assertEqual(self.successResultOf(self.verify(c)), d.id)
        self.assertEqual(self.refused(c), f"replayed Connect of device {d.id} (its nonce was accepted before)")

    def test_bad_proofs_are_refused_with_their_reason(self):
        d = Device()
        self.assertRegex(self.refused(Device(ca=(OTHER_CA_KEY, OTHER_CA_CERT)).connect(self.clock.seconds())),
                         "certificate")
        self.assertRegex(self.refused(d.connect(self.clock.seconds() - 400)), "stale nonce")
        self.assertEqual(self.refused(bound_connect(d, self.clock.seconds(), b"E" * 32)),
                         "Connect bound to its TLS session, but not a TLS connection")

    def test_registry_asked_through_the_router(self):
        registry = DeviceRegistry(Path(self.mktemp() + ".sqlite3"))
        self.addCleanup(registry.close)
        self.gw.router.registry = registry
        d = Device()
        self.assertEqual(self.refused(d.connect(self.clock.seconds())),
                         f"device {d.id}: " + registry.check(d.der, d.id, self.clock.seconds()))
        registry.record_cert(d.cert, "test")
        self.assertEqual(self.successResultOf(self.verify(d.connect(self.clock.seconds()))), d.id)
        registry.revoke(d.id, self.clock.seconds())
        self.assertRegex(self.refused(d.connect(self.clock.seconds())), f"device {d.id}: .*revoked")

    def test_one_device_cannot_fill_the_replay_cache(self):
        """Item 4: fresh nonce-only Connects of one enrolled device take at most its quota;
        other devices still connect."""
        greedy, other = Device(), Device()
        for i in range(2):
            self.clock.advance(0.01)  # a new nonce each time
            self.successResultOf(self.verify(greedy.connect(self.clock.seconds())))
        self.clock.advance(0.01)
        self.assertRegex(self.refused(greedy.connect(self.clock.seconds())),
                         f"device {greedy.id} holds 2 live nonces \\(--replay-per-device\\): nonce-only Connects")
        self.assertEqual(len(self.verifier.replay_cache), 2)
        self.assertEqual(self.successResultOf(self.verify(other.connect(self.clock.seconds()))), other.id)
        # Its nonces expire (nonce time + 300 s): its room comes back.
        self.clock.advance(tls.NONCE_WINDOW + 1)
        self.successResultOf(self.verify(greedy.connect(self.clock.seconds())))

    def test_quota_error_is_a_full_cache_error(self):
        cache = MemoryReplayCache(10, self.clock, per_owner=1)
        self.assertFalse(self.successResultOf(cache.seen(b"a", self.clock.seconds() + 10, owner="d")))
        self.failureResultOf(cache.seen(b"b", self.clock.seconds() + 10, owner="d"), TooManyNonces)
        self.assertFalse(self.successResultOf(cache.seen(b"b", self.clock.seconds() + 10, owner="e")))
        self.assertFalse(self.successResultOf(cache.seen(b"c", self.clock.seconds() + 10)), "no owner, no quota")
        cache.stop()


class UnauthenticatedCapTests(unittest.TestCase):
    """Item 8: connections not yet past Connect have their own cap, so they cannot take
    the room of connected devices."""

    def setUp(self):
        self.gw = Gateway(max_unauthenticated=2)
        self.log = LogCapture(self)

    def test_over_the_cap_closed_at_once_connected_ones_leave_it(self):
        (p1, t1), (p2, t2) = self.gw.connection(), self.gw.connection()
        p3, t3 = self.gw.connection()
        self.assertTrue(t3.disconnected, "a third pre-Connect connection is aborted")
        self.assertFalse(t1.disconnecting or t2.disconnecting)
        self.assertIn("over --max-unauthenticated", self.log.reasons())
        p3.connectionLost(None)
        # One of them connects: it no longer counts, so room for one more.
        p1.dataReceived(Device().connect(self.gw.clock.seconds()).encode())
        self.assertEqual(frames_of(t1.value())[0].status, wire.STATUS_OK)
        p4, t4 = self.gw.connection()
        self.assertFalse(t4.disconnecting)
        self.assertEqual(self.gw.factory.unauthenticated, 2)
        for p in (p1, p2, p4):
            p.connectionLost(None)
        self.assertEqual(self.gw.factory.unauthenticated, 0)

    def test_option_reaches_the_courier(self):
        from twisted.internet import task

        from pushd.gateway.tap import Options, makeService

        o = Options()
        o.parseOptions(["--max-unauthenticated", "7", "--replay-per-device", "3", "--store", "memory",
                        "--state-dir", self.mktemp(), "--courier", "tls:0:interface=127.0.0.1",
                        "--provider", "tls:0:interface=127.0.0.1"])
        top = makeService(o, task.Clock())
        couriers = []
        for s in top:
            f = getattr(s, "factory", None)
            while hasattr(f, "wrappedFactory"):
                f = f.wrappedFactory
            if hasattr(f, "max_unauthenticated"):
                couriers.append((f.max_unauthenticated, f.replay_cache.per_owner))
        self.assertEqual(couriers, [(7, 3)])


class CloseTests(unittest.TestCase):
    """Item 10: a closed connection is aborted if its (TLS) close does not finish."""

    def setUp(self):
        self.gw = Gateway()

    def test_connected_device_closed_for_a_violation_is_aborted_soon(self):
        p, t, ack = self.gw.connected(Device())
        p.dataReceived(Device().connect(self.gw.clock.seconds()).encode())  # a second Connect
        self.assertTrue(t.disconnecting)
        self.gw.clock.advance(ABORT_AFTER - 0.5)
        self.assertFalse(t.disconnected)
        self.gw.clock.advance(1.5)  # the wheel's resolution
        self.assertTrue(t.disconnected, "aborted, not left until the silence deadline")

    def test_refused_connect_is_aborted_before_the_connect_deadline(self):
        p, t = self.gw.connection()
        p.dataReceived(Device(ca=(OTHER_CA_KEY, OTHER_CA_CERT)).connect(self.gw.clock.seconds()).encode())
        self.assertTrue(t.disconnecting)
        self.gw.clock.advance(ABORT_AFTER + 1)
        self.assertTrue(t.disconnected)

    def test_reading_resumes_when_a_held_connect_is_refused(self):
        """Its TLS close must read the peer's close_notify."""
        cache = self.gw.factory.replay_cache = SlowCache()
        p, t = self.gw.connection()
        p.dataReceived(Device().connect(self.gw.clock.seconds()).encode())
        self.assertEqual(t.producerState, "paused")
        cache.calls[0].errback(ConnectionError("Redis did not answer"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.producerState, "producing")

    def test_closed_while_held_resumes_reading(self):
        cache = self.gw.factory.replay_cache = SlowCache()
        p, t = self.gw.connection()
        p.dataReceived(Device().connect(self.gw.clock.seconds()).encode())
        p.dataReceived(b"\xff" * (self.gw.factory.connect_budget + 1))
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.producerState, "producing")
        cache.calls[0].callback(False)
        self.assertIsNone(p.device_id, "closed: the late answer does nothing")


class HeldBytesTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway(connect_budget=1024)
        self.cache = self.gw.factory.replay_cache = SlowCache()
        self.log = LogCapture(self)

    def test_bytes_held_while_verifying_are_bounded(self):
        """Item 11: what arrives while a Connect is verified is held up to --connect-budget."""
        p, t = self.gw.connection()
        p.dataReceived(Device().connect(self.gw.clock.seconds()).encode())
        p.dataReceived(b"\x00" * 1000)
        self.assertFalse(t.disconnecting)
        p.dataReceived(b"\x00" * 100)
        self.assertTrue(t.disconnecting)
        self.assertIn("over --connect-budget bytes while its Connect was verified", self.log.reasons())
        self.assertIsNone(p._proving)

    def test_unframed_bytes_kept_even_if_the_decoder_generator_lives_on(self):
        """Item 13: the bytes after a Connect, in the same read, are kept in the decoder by
        an explicit close of its generator, not by CPython dropping it at once."""
        p, t = self.gw.connection()
        kept = []

        class KeepingDecoder(wire.FrameDecoder):
            def feed(self, data):
                g = super().feed(data)
                kept.append(g)  # as a runtime without reference counting: not finalized yet
                return g

        p.decoder = KeepingDecoder(p.decoder.max_frame)
        filt = wire.Filter(enabled=[TH]).encode()
        p.dataReceived(Device().connect(self.gw.clock.seconds()).encode() + filt[:7])
        p.dataReceived(filt[7:])  # held meanwhile
        self.cache.calls[0].callback(False)
        self.assertEqual(frames_of(t.value())[0].status, wire.STATUS_OK)
        self.assertFalse(t.disconnecting, self.log.reasons())
        self.assertEqual(p.session.topics, {TH})


class CourierUsesTheRouterTests(unittest.TestCase):
    """Item 14: the courier reaches the store and the registry through the router only."""

    def test_scoped_token_and_unregister_go_through_the_router(self):
        gw = Gateway()
        calls = []
        gw.router.revalidate = lambda token: calls.append(("revalidate", token)) or defer.succeed(None)
        gw.router.invalidate = lambda token, when: calls.append(("invalidate", token)) or defer.succeed(None)

        class NoStore:
            def __getattr__(self, name):
                raise AssertionError(f"the courier used router.store.{name}")

        p, t, ack = gw.connected(Device())
        gw.router.store = NoStore()
        p.dataReceived(wire.ScopedToken(topic=TH).encode())
        (st,) = frames_of(t.value())
        p.dataReceived(wire.Unregister(topic=TH, token=st.scoped_token).encode())
        self.assertEqual(calls, [("revalidate", st.scoped_token), ("invalidate", st.scoped_token)])

    def test_tokens_come_from_the_router(self):
        gw = Gateway()
        minter, calls = gw.router.tokens, []
        gw.router.base_token = lambda device: calls.append("base") or minter.base_token(device)
        gw.router.scoped_token = lambda device, th: calls.append("scoped") or minter.scoped_token(device, th)

        class NoTokens:
            def __getattr__(self, name):
                raise AssertionError(f"the courier used router.tokens.{name}")

        gw.router.tokens = NoTokens()
        p, t, ack = gw.connected(Device())
        self.assertEqual(ack.status, wire.STATUS_OK)
        p.dataReceived(wire.ScopedToken(topic=TH).encode())
        (st,) = frames_of(t.value())
        p.dataReceived(wire.Unregister(topic=TH, token=st.scoped_token).encode())
        self.assertFalse(t.disconnecting)
        self.assertEqual(calls, ["base", "scoped", "scoped"])
