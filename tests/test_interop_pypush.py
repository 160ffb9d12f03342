"""pypush 2.0.2, an unmodified third-party APNs courier client, against a real gateway."""

import sys

from twisted.internet import defer
from twisted.trial import unittest

from . import procs
from .stack import Stack


class PypushTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_pypush_full_flow(self):
        s = Stack(self)
        yield s.start_gateway()
        client = procs.spawn(
            "pypush",
            [sys.executable, "-m", "tests.interop.pypush_client",
             str(s.courier_port), str(s.provider_port), str(s.gw_state), str(s.dir / "pypush")],
            procs.ROOT,
        )
        self.addCleanup(client.stop)
        code = yield client.ended
        out = "\n".join(client.lines)
        if code != 0 or out.count("received") != 2:
            self.fail(f"pypush:\n{out}\n{s.gateway.log()}")
        self.assertRegex(out, r"base token [0-9a-f]{64}")
        self.assertRegex(out, r"scoped token [0-9a-f]{64}")
        self.assertEqual(out.count("provider status 200"), 2, out)
        self.assertRegex(out, r'received \{"n": 0\} id [0-9a-f]{32}')
        self.assertRegex(out, r'received \{"n": 1\} id [0-9a-f]{32}')
        self.assertIn("keepalive answered", out)
        self.assertIn("done", out)
        # Both acks reached the gateway: nothing was left in flight when pypush hung up.
        m = yield s.gateway.wait_for(r"disconnected \((\d+) unacked kept\)")
        self.assertEqual(m.group(1), "0", f"pypush:\n{out}\n{s.gateway.log()}")
