"""
One way to log events that anyone on the internet can cause (refused connections, bad
frames, refused requests): at most one line per interval, the rest counted by reason. A
line per hostile event is itself a flood (an HTTP/2 protocol error once gave 9,001 lines).
"""

from __future__ import annotations


class LogThrottle:
    """
    At most one log line per ``interval`` for events anyone can cause (refused or closed
    unauthenticated connections): the first event of a quiet period is logged at once,
    the rest are counted by reason and logged together when the interval is over.
    """

    #: Distinct reasons kept per line; beyond, they count as "other" (reasons may carry
    #: numbers from the peer, and the dict must stay bounded).
    MAX_REASONS = 16

    def __init__(self, clock, emit, interval: float = 1.0):
        self.clock = clock
        self.emit = emit  # emit(counts: dict, total: int, sample: dict)
        self.interval = interval
        self.counts: dict = {}
        self.sample: dict = {}
        self.total = 0  # every event ever noted
        self._last = None
        self._call = None

    def note(self, reason: str, **sample) -> None:
        self.total += 1
        counts = self.counts
        if reason not in counts and len(counts) >= self.MAX_REASONS:
            reason = "other"
        counts[reason] = counts.get(reason, 0) + 1
        self.sample = sample
        if self._call is not None:
            return
        now = self.clock.seconds()
        if self._last is None or now - self._last >= self.interval:
            self.flush()
        else:
            self._call = self.clock.callLater(self._last + self.interval - now, self._due)

    def _due(self):
        self._call = None
        self.flush()

    def flush(self) -> None:
        if self.counts:
            counts, self.counts = self.counts, {}
            self.emit(counts, sum(counts.values()), self.sample)
            self._last = self.clock.seconds()

    def stop(self) -> None:
        """Log what is pending and leave no timer."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self.flush()
