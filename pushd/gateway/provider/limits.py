"""
The provider API's limits (each a gateway setting, see tap.py) and a log that says a hostile
thing happened at most once a second, with how many times.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

#: HTTP/2's initial connection window: a smaller body budget could not be enforced by flow control.
H2_INITIAL_WINDOW = 65_535


@dataclass(frozen=True)
class Limits:
    #: Seconds from connection start (and from a request's first byte) to its complete headers
    #: (HTTP/1.1, and HTTP/2 before a valid token: and body).
    header_deadline: float = 5.0
    #: Streams at once on an HTTP/2 connection once a valid provider token arrived (APNs: 1 before).
    max_streams: int = 1000
    #: Bytes of bodies of not yet dispatched streams on one HTTP/2 connection (its flow-control window).
    body_budget: int = 256 * 1024
    #: Requests (HEADERS) per HTTP/2 connection per second; beyond: GOAWAY ENHANCE_YOUR_CALM.
    requests_per_second: int = 10000
    #: RST_STREAMs from the client per HTTP/2 connection per second; beyond: GOAWAY ENHANCE_YOUR_CALM.
    resets_per_second: int = 100
    #: Bytes of one HTTP/2 header block (HEADERS + CONTINUATION, HPACK-encoded and decoded).
    max_header_bytes: int = 16 * 1024
    #: Frames that carry no request bytes (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, RST_STREAM,
    #: GOAWAY, unknown types, empty DATA/HEADERS/CONTINUATION) per HTTP/2 connection per second.
    control_frames_per_second: int = 1000
    #: Seconds from a stream's HEADERS to the end of its body, once the connection has a valid
    #: token (before, ``header_deadline`` holds the whole connection); beyond: 400 IdleTimeout.
    body_deadline: float = 5.0


class ThrottledLog:
    """One log line a second at most for one kind of event; the rest are counted into the next."""

    def __init__(self, clock, log: Logger, fmt: str, interval: float = 1.0):
        self.clock = clock
        self.log = log
        self.fmt = fmt
        self.interval = interval
        self._last = None
        self.suppressed = 0
        self.total = 0

    def __call__(self, **fields) -> None:
        self.total += 1
        now = self.clock.seconds()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return
        self._last = now
        self.log.info(self.fmt + " ({suppressed} more like it since the last line)",
                      suppressed=self.suppressed, **fields)
        self.suppressed = 0


def at_least(kind, minimum: int, option: str):
    """An option coercer: a number of ``kind``, at least ``minimum``; the error names the option."""

    def coerce(value):
        try:
            v = kind(value)
        except ValueError:
            raise ValueError(f"--{option}: {value!r} is not a number") from None
        if v < minimum:
            raise ValueError(f"--{option} must be at least {minimum}")
        return v

    coerce.coerceDoc = f"At least {minimum}."
    return coerce
