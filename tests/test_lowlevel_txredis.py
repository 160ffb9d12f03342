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
