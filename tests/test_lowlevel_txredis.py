"""The quarantine of txredisapi internals (pushd._lowlevel.txredis) against the installed txredisapi."""

from __future__ import annotations

from unittest import mock

import txredisapi
from twisted.trial import unittest

from pushd._lowlevel import txredis


class SelfCheckTests(unittest.TestCase):
    def test_installed_txredisapi_is_compatible(self):
        self.assertEqual(txredis.self_check(), [])

    def test_hiredis_parses_the_replies(self):
        """setup.cfg asks for hiredis, and txredisapi must have picked its protocol by itself."""
        import hiredis  # noqa: F401  (a missing dependency fails here)

        self.assertIs(txredisapi.RedisFactory.protocol, txredisapi.HiredisProtocol)

    def test_fails_on_another_release(self):
        with mock.patch.object(txredisapi, "__version__", "1.7.0"):
            self.assertIn("outside the supported range", " ".join(txredis.self_check()))

    def test_fails_when_a_hook_point_is_gone(self):
        with mock.patch.object(txredisapi.RedisFactory, "addConnection", None, create=True):
            del txredisapi.RedisFactory.addConnection
            self.assertIn("RedisFactory has no addConnection", " ".join(txredis.self_check()))

    def test_fails_when_replies_are_not_queued(self):
        original = txredisapi.BaseRedisProtocol.__init__

        def without_queue(proto, *a, **kw):
            original(proto, *a, **kw)
            del proto.replyQueue

        with mock.patch.object(txredisapi.BaseRedisProtocol, "__init__", without_queue):
            self.assertIn("replyQueue", " ".join(txredis.self_check()))


class SentinelLookupTests(unittest.TestCase):
    def test_closing_waits_for_a_master_lookup_in_flight(self):
        """A pool closed while it asks the sentinels for the master fires only once that
        look-up has ended: its timer (txredisapi's, on the global reactor) is not left
        behind. Without the wait trial reports the reactor unclean."""
        from twisted.internet import reactor

        from tests.procs import free_port

        pool = txredis.sentinel_pool([("127.0.0.1", free_port())], "nobody", dbid=0, poolsize=1, password=None,
                                     username=None, connect_timeout=0.2, on_connection=lambda conn: None,
                                     discovery_timeout=0.3)
        pool.on_failure(lambda f: None)

        def closed(_):
            left = [c for c in reactor.getDelayedCalls() if "discover_master" in repr(c.func)]
            self.assertEqual(left, [])

        return pool.disconnect().addCallback(closed)
