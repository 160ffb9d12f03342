from twisted.trial import unittest

from pushd.device.keepalive import AdaptiveKeepalive


class AdaptiveKeepaliveTests(unittest.TestCase):
    def test_grows_while_answered_up_to_the_maximum(self):
        k = AdaptiveKeepalive(minimum=30, maximum=300, growth=2)
        seen = []
        for _ in range(6):
            seen.append(k.interval)
            k.succeeded()
        self.assertEqual(seen, [30, 60, 120, 240, 300, 300])

    def test_never_above_what_the_gateway_accepts(self):
        k = AdaptiveKeepalive(minimum=30, maximum=600, growth=2)
        k.gateway_accepts(100)
        for _ in range(5):
            k.succeeded()
        self.assertEqual(k.interval, 100)

    def test_failure_falls_back_to_last_good_and_caps_there(self):
        k = AdaptiveKeepalive(minimum=30, maximum=600, growth=2)
        for _ in range(3):
            k.succeeded()  # 30, 60, 120 answered; now trying 240
        self.assertEqual(k.interval, 240)
        k.failed()
        self.assertEqual((k.interval, k.ceiling), (120, 120))
        k.succeeded()
        self.assertEqual(k.interval, 120, "stays at the last good value")

    def test_failure_at_a_good_value_steps_below_it(self):
        k = AdaptiveKeepalive(minimum=30, maximum=600, growth=2)
        k.succeeded()
        k.failed()  # 60 failed: back to 30
        k.failed()  # 30 failed too (a bad network): cannot go below the minimum
        self.assertEqual(k.interval, 30)

    def test_probes_again_after_a_while(self):
        k = AdaptiveKeepalive(minimum=30, maximum=600, growth=2, probe_after=3)
        k.succeeded()
        k.failed()  # ceiling 30
        for _ in range(3):
            k.succeeded()
        self.assertEqual(k.ceiling, 600)
        k.succeeded()
        self.assertEqual(k.interval, 120)

    def test_bad_bounds(self):
        self.assertRaises(ValueError, AdaptiveKeepalive, minimum=0)
        self.assertRaises(ValueError, AdaptiveKeepalive, minimum=60, maximum=30)
