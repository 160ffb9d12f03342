"""
The adaptive keepalive interval. A keepalive costs battery and radio time, so the device
keeps the longest interval the network path tolerates (NATs and firewalls drop idle flows):

- start at the minimum;
- after each answered keepalive, remember the interval as good and grow it by ``growth``,
  up to the ceiling (the configured maximum, and never above what the gateway accepts);
- when a keepalive goes unanswered (the connection is then dropped and re-made), fall back
  to the last good interval and make it the ceiling: the longer one did not survive the path;
- after ``probe_after`` answered keepalives at a lowered ceiling, lift the ceiling again and
  resume growing (the network may have changed).
"""

from __future__ import annotations


class AdaptiveKeepalive:
    def __init__(self, minimum: float = 30.0, maximum: float = 600.0, growth: float = 1.5, probe_after: int = 20):
        if not 0 < minimum <= maximum:
            raise ValueError("keepalive minimum must be positive and not above the maximum")
        self.minimum = minimum
        self.maximum = maximum
        self.growth = growth
        self.probe_after = probe_after
        self.gateway = maximum  # the longest interval the gateway accepts (ConnectAck)
        self.ceiling = maximum  # lowered by failures
        self.interval = minimum
        self.last_good = None
        self._at_ceiling = 0
        self.failures = 0

    @property
    def cap(self) -> float:
        return min(self.maximum, self.gateway, self.ceiling)

    def gateway_accepts(self, seconds: float) -> None:
        """The gateway closes connections silent for longer than this (times its grace)."""
        self.gateway = max(1.0, float(seconds))
        self.interval = min(self.interval, self.cap)

    def succeeded(self) -> None:
        self.last_good = self.interval
        if self.interval >= self.cap:
            self._at_ceiling += 1
            if self.ceiling < self.maximum and self._at_ceiling >= self.probe_after:
                self.ceiling = self.maximum
                self._at_ceiling = 0
        self.interval = min(self.interval * self.growth, self.cap)

    def failed(self) -> None:
        self.failures += 1
        self._at_ceiling = 0
        good = self.last_good if self.last_good is not None else self.minimum
        if good >= self.interval:
            # Even the last good interval failed: step below it.
            good = max(min(self.minimum, self.cap), self.interval / self.growth)
        self.ceiling = max(good, min(self.minimum, self.gateway))
        self.interval = min(good, self.cap)
        self.last_good = None
