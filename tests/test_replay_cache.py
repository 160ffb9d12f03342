"""
The Connect replay cache contract, on both providers: memory (a task.Clock) and Redis (a real
redis-server, the same Clock for the nonces' time): a repeat, expiry, the bounds.
"""

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pushd.gateway.replay import MemoryReplayCache, TooManyNonces, nonce_key
from pushd.store.interfaces import IReplayCache, ReplayCacheFull
from pushd.store.redis import RedisStore
from pushd.store.redis_replay import RedisReplayCache

from .redis_server import RedisServer

T0 = 1_800_000_000.0


class ReplayCacheContract:
    """
    Mixed into a TestCase that defines ``makeCache(max_entries, per_owner)`` (a Deferred or
    not) on ``self.clock``. Every call is yielded: a remote cache answers later.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.cache = yield self.makeCache(3, 2)

    def seen(self, key, expires_at, owner=None):
        return self.cache.seen(key, expires_at, owner=owner)

    def test_provides_the_interface(self):
        self.assertTrue(verifyObject(IReplayCache, self.cache))

    @defer.inlineCallbacks
    def test_repeat_is_seen(self):
        self.assertFalse((yield self.seen(b"a", T0 + 300)))
        self.assertTrue((yield self.seen(b"a", T0 + 300)))
        self.assertFalse((yield self.seen(b"b", T0 + 300)), "another key is not a repeat")

    @defer.inlineCallbacks
    def test_remembered_until_expiry_then_forgotten(self):
        yield self.seen(b"a", T0 + 300)
        self.clock.advance(300)  # exactly at expiry: the nonce is still fresh, still remembered
        self.assertTrue((yield self.seen(b"a", T0 + 300)))
        self.clock.advance(0.001)
        self.assertFalse((yield self.seen(b"a", T0 + 600)), "expired: forgotten (and remembered anew)")

    @defer.inlineCallbacks
    def test_expired_entries_make_room(self):
        for k in (b"a", b"b", b"c"):
            yield self.seen(k, T0 + 10)
        self.clock.advance(11)
        self.assertFalse((yield self.seen(b"d", T0 + 400)))
        self.assertFalse((yield self.seen(b"e", T0 + 400)))

    @defer.inlineCallbacks
    def test_full_refuses_rather_than_forgets(self):
        for k, until in ((b"a", T0 + 10), (b"b", T0 + 300), (b"c", T0 + 300)):
            yield self.seen(k, until)
        with self.assertRaises(ReplayCacheFull) as e:
            yield self.seen(b"d", T0 + 300)
        self.assertIn("cache full (3 nonces)", str(e.exception))
        self.assertTrue((yield self.seen(b"a", T0 + 10)), "nothing live was forgotten to make room")
        self.assertEqual(self.cache.refused_full, 1)
        self.clock.advance(11)  # a's nonce is stale now: its room is free again
        self.assertFalse((yield self.seen(b"d", T0 + 300)))

    @defer.inlineCallbacks
    def test_per_owner_quota(self):
        self.assertFalse((yield self.seen(b"a", T0 + 10, "dev1")))
        self.assertFalse((yield self.seen(b"b", T0 + 300, "dev1")))
        with self.assertRaises(TooManyNonces) as e:
            yield self.seen(b"c", T0 + 300, "dev1")
        self.assertIn("holds 2 live nonces (--replay-per-device)", str(e.exception))
        self.assertIsInstance(e.exception, ReplayCacheFull)
        self.assertFalse((yield self.seen(b"c", T0 + 300, "dev2")), "another device is not refused")
        self.assertTrue((yield self.seen(b"a", T0 + 10, "dev1")), "a repeat is still a repeat")
        self.clock.advance(11)  # its first nonce expires: room for one more
        self.assertFalse((yield self.seen(b"d", T0 + 300, "dev1")))

    @defer.inlineCallbacks
    def test_needs_room(self):
        with self.assertRaises(ValueError):
            yield self.makeCache(0, 1)
        with self.assertRaises(ValueError):
            yield self.makeCache(1, 0)


class MemoryReplayCacheTests(ReplayCacheContract, unittest.TestCase):
    def makeCache(self, max_entries, per_owner):
        return MemoryReplayCache(max_entries, self.clock, per_owner)

    def test_bounded_in_memory(self):
        for k in (b"a", b"b", b"c"):
            self.successResultOf(self.cache.seen(k, T0 + 10))
        self.failureResultOf(self.cache.seen(b"d", T0 + 300), ReplayCacheFull)
        self.assertEqual(len(self.cache), 3)
        self.clock.advance(11)
        self.successResultOf(self.cache.seen(b"d", T0 + 300))
        self.assertEqual(len(self.cache), 1)

    def test_full_logged_at_most_once_a_second(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for k in (b"a", b"b", b"c"):
            self.successResultOf(self.cache.seen(k, T0 + 3600))
        for i in range(12):
            self.failureResultOf(self.cache.seen(b"x%d" % i, T0 + 300), ReplayCacheFull)
            self.clock.advance(0.25)  # 3 s in all
        self.cache.stop()  # logs what is pending
        full = [e for e in events if "replay cache refused" in e.get("log_format", "")]
        self.assertEqual([e["counts"] for e in full], [{"cache full": n} for n in (1, 3, 4, 4)],
                         "one line a second, with the count, none lost")
        self.assertEqual(self.cache.refused_full, 12)


class RedisReplayCacheTests(ReplayCacheContract, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.store = RedisStore(self.redis.url)
        self.addCleanup(self.store.close)
        yield super().setUp()

    def makeCache(self, max_entries, per_owner):
        # skew 0: the contract's exact expiry (nodes' clock skew is covered by default).
        cache = RedisReplayCache(self.store, "replay", max_entries, per_owner, self.clock, skew=0)
        self.addCleanup(cache.stop)
        return cache

    @defer.inlineCallbacks
    def test_keys_bounded_and_expiring_in_redis(self):
        """The sets hold only live nonces, and carry an expiry past their last one."""
        yield self.seen(b"a", T0 + 10, "dev1")
        yield self.seen(b"b", T0 + 300, "dev1")
        self.clock.advance(11)
        yield self.seen(b"c", T0 + 300, "dev2")
        everything = yield self.store._command(b"ZCARD", b"pushd:replay:nonces")
        dev1 = yield self.store._command(b"ZCARD", b"pushd:{dev1}:replay:nonces")
        self.assertEqual((int(everything), int(dev1)), (2, 2), "dev1's stale nonce: pruned from all now, from its own set on its next call")
        yield self.seen(b"d", T0 + 300, "dev1")
        dev1 = yield self.store._command(b"ZCARD", b"pushd:{dev1}:replay:nonces")
        everything = yield self.store._command(b"ZCARD", b"pushd:replay:nonces")
        self.assertEqual((int(everything), int(dev1)), (3, 2))
        for key in (b"pushd:replay:nonces", b"pushd:{dev1}:replay:nonces"):
            at = yield self.store._command(b"EXPIRETIME", key)
            self.assertEqual(int(at), int(T0 + 300) + 1, key)


class NonceKeyTests(unittest.TestCase):
    def test_names_device_and_nonce(self):
        n1, n2 = b"\x00" + b"1" * 16, b"\x00" + b"2" * 16
        a, b = "a" * 32, "b" * 32
        self.assertEqual(nonce_key(a, n1), nonce_key(a, n1))
        self.assertEqual(len({nonce_key(a, n1), nonce_key(a, n2), nonce_key(b, n1)}), 3)
        self.assertEqual(len(nonce_key(a, n1)), 16)


class OptionTests(unittest.TestCase):
    def parse(self, argv):
        from pushd.gateway.tap import Options

        o = Options()
        o.parseOptions(argv)
        return o

    def test_default_and_given_size_reach_the_courier(self):
        from pushd.gateway.tap import makeService

        self.assertEqual(self.parse([])["replay-cache-size"], 100_000)
        o = self.parse(["--replay-cache-size", "5", "--store", "memory", "--state-dir", self.mktemp(),
                        "--courier", "tls:0:interface=127.0.0.1", "--provider", "tls:0:interface=127.0.0.1"])
        top = makeService(o, task.Clock())
        def innermost(f):
            while hasattr(f, "wrappedFactory"):  # admission, then TLS
                f = f.wrappedFactory
            return f

        couriers = [innermost(s.factory) for s in top if hasattr(getattr(s, "factory", None), "wrappedFactory")]
        self.assertEqual([c.replay_cache.max_entries for c in couriers if hasattr(c, "replay_cache")], [5])

    def test_bad_size_names_the_option(self):
        from twisted.python import usage

        for bad in ("0", "-1", "many"):
            with self.assertRaisesRegex(usage.UsageError, "--replay-cache-size must be"):
                self.parse(["--replay-cache-size", bad])
