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

    def __len__(self):
        return len(self._buckets)

    def keys(self):
        return self._buckets.keys()

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

    def forget_full(self) -> None:
        """Forget the least recently used buckets that are full again, oldest first until
        one is not: lossless (a key forgotten starts full), and it keeps the table to the
        keys that used their bucket lately."""
        now = self.clock.seconds()
        buckets = self._buckets
        while buckets:
            key, (tokens, last) = next(iter(buckets.items()))
            if tokens + (now - last) * self.rate < self.burst:
                break
            del buckets[key]
