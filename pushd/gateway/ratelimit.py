"""
Token buckets in memory, one per key (a device token, a team): cheap enough to check on
every request, with no store round trip. The number of buckets is bounded; the least
recently used is forgotten first (and starts full if it comes back).
"""

from __future__ import annotations

from collections import OrderedDict


class Buckets:
    def __init__(self, rate: float, burst: float, clock, max_keys: int = 100_000):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict = OrderedDict()  # key -> (tokens, last time)
        self.refused = 0

    def allow(self, key) -> bool:
        now = self.clock.seconds()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        else:
            self.refused += 1
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok
