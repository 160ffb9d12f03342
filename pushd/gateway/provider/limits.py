"""
The provider API's limits (each a gateway setting, see tap.py) and a log that says a hostile
thing happened at most once a second, with how many times (pushd.throttle).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

from pushd.throttle import LogThrottle

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
    #: Seconds from a connection's start to its first valid provider token (or operator key);
    #: beyond, it is closed (HTTP/2: GOAWAY). Refused requests do not extend it.
    auth_deadline: float = 10.0
    #: Requests refused on their headers that a connection without a valid token may make;
    #: at this many it is closed (HTTP/2: GOAWAY ENHANCE_YOUR_CALM; HTTP/1.1: Connection: close).
    unauthenticated_requests: int = 10


class EventLog:
    """
    One kind of hostile event (``log(peer=..., why=...)``), logged through the one LogThrottle:
    a line at once, then at most one a second with the count by reason, the last count too.
    """

    def __init__(self, clock, log: Logger, fmt: str, interval: float = 1.0):
        self.log = log
        self.fmt = fmt
        self.throttle = LogThrottle(clock, self._emit, interval)

    def __call__(self, peer="", why="") -> None:
        self.throttle.note(why, peer=peer, why=why)

    def _emit(self, counts, total, sample):
        self.log.info(self.fmt + " ({total} since the last line: {counts})", total=total, counts=counts, **sample)

    def stop(self) -> None:
        self.throttle.stop()
