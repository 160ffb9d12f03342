from twisted.internet import task
from twisted.trial import unittest

from pushd.gateway.ratelimit import Buckets


class BucketTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.b = Buckets(rate=2, burst=3, clock=self.clock, max_keys=2)

    def test_burst_then_rate(self):
        self.assertEqual([self.b.allow("a") for _ in range(4)], [True, True, True, False])
        self.clock.advance(0.5)
        self.assertEqual([self.b.allow("a"), self.b.allow("a")], [True, False])
        self.clock.advance(10)
        self.assertEqual([self.b.allow("a") for _ in range(4)], [True, True, True, False])
        self.assertEqual(self.b.refused, 3)

    def test_keys_are_separate_and_bounded(self):
        for _ in range(3):
            self.b.allow("a")
        self.assertTrue(self.b.allow("b"))
        self.assertFalse(self.b.allow("a"))
        self.b.allow("c")  # evicts the least recently used ("b")
        self.assertEqual(len(self.b._buckets), 2)
        self.assertNotIn("b", self.b._buckets)

    def test_full_buckets_forgotten_oldest_first(self):
        b = Buckets(rate=1, burst=2, clock=self.clock, max_keys=10)
        b.allow("old")
        self.clock.advance(1.5)
        b.allow("new")
        b.forget_full()
        self.assertEqual(list(b.keys()), ["new"], "old is full again (lossless to forget), new is not")
        self.clock.advance(1)
        b.forget_full()
        self.assertEqual(len(b), 0)
