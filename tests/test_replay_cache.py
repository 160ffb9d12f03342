"""The Connect replay cache (memory provider) on a task.Clock: a repeat, expiry, the bound."""

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pushd.gateway.replay import MemoryReplayCache, nonce_key
from pushd.store.interfaces import IReplayCache, ReplayCacheFull

T0 = 1_800_000_000.0


class MemoryReplayCacheTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.cache = MemoryReplayCache(3, self.clock)

    def seen(self, key, expires_at):
        return self.successResultOf(self.cache.seen(key, expires_at))

    def test_provides_the_interface(self):
        self.assertTrue(verifyObject(IReplayCache, self.cache))

    def test_repeat_is_seen(self):
        self.assertFalse(self.seen(b"a", T0 + 300))
        self.assertTrue(self.seen(b"a", T0 + 300))
        self.assertFalse(self.seen(b"b", T0 + 300), "another key is not a repeat")

    def test_remembered_until_expiry_then_forgotten(self):
        self.seen(b"a", T0 + 300)
        self.clock.advance(300)  # exactly at expiry: the nonce is still fresh, still remembered
        self.assertTrue(self.seen(b"a", T0 + 300))
        self.clock.advance(0.001)
        self.assertFalse(self.seen(b"a", T0 + 600), "expired: forgotten (and remembered anew)")
        self.assertEqual(len(self.cache), 1)

    def test_expired_entries_make_room(self):
        for k in (b"a", b"b", b"c"):
            self.seen(k, T0 + 10)
        self.clock.advance(11)
        self.assertFalse(self.seen(b"d", T0 + 400))
        self.assertEqual(len(self.cache), 1)

    def test_full_refuses_rather_than_forgets(self):
        for k, until in ((b"a", T0 + 10), (b"b", T0 + 300), (b"c", T0 + 300)):
            self.seen(k, until)
        f = self.failureResultOf(self.cache.seen(b"d", T0 + 300), ReplayCacheFull)
        self.assertIn("replay cache full (3 nonces)", f.getErrorMessage())
        self.assertEqual(len(self.cache), 3, "bounded")
        self.assertTrue(self.seen(b"a", T0 + 10), "nothing live was forgotten to make room")
        self.assertEqual(self.cache.refused_full, 1)
        self.clock.advance(11)  # a's nonce is stale now: its room is free again
        self.assertFalse(self.seen(b"d", T0 + 300))

    def test_full_logged_at_most_once_a_second(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for k in (b"a", b"b", b"c"):
            self.seen(k, T0 + 3600)
        for i in range(12):
            self.failureResultOf(self.cache.seen(b"x%d" % i, T0 + 300), ReplayCacheFull)
            self.clock.advance(0.25)  # 3 s in all
        self.cache.stop()  # logs what is pending
        full = [e for e in events if "replay cache refused" in e.get("log_format", "")]
        self.assertEqual([e["counts"] for e in full], [{"cache full": n} for n in (1, 3, 4, 4)],
                         "one line a second, with the count, none lost")
        self.assertEqual(self.cache.refused_full, 12)

    def test_needs_room(self):
        self.assertRaises(ValueError, MemoryReplayCache, 0, self.clock)


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
