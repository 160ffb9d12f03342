"""
The hostile-network fault suite (``bench/faults.py``), small: three real device daemons
behind the fault proxy, a real gateway killed and restarted once, one device's clock
jumping past the nonce window. Every kind of fault must happen, and nothing accepted and
unexpired may be lost.
"""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.trial import unittest

from bench import faults


class FaultSuiteTests(unittest.TestCase):
    timeout = 150

    @defer.inlineCallbacks
    def test_nothing_accepted_is_lost_under_faults(self):
        if faults.libfaketime() is None:
            self.fail("the clock jump needs libfaketime: apt-get install faketime")
        out = io.StringIO()
        cfg = faults.Config(devices=3, duration=12, rate=10, seed=20261202, kills=1, gap=(0.5, 1.5), out=out)
        suite, total = yield faults.run(cfg)
        report = out.getvalue()
        for kind in faults.FAULTS:
            self.assertGreater(suite.rows[kind].injected, 0, f"{kind} never happened:\n{report}")
        self.assertGreater(total.accepted, 50, report)
        self.assertEqual(total.lost, 0, report)
        self.assertEqual(total.dup_app, 0, report)
