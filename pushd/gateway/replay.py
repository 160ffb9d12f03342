"""
The Connect replay cache for nonce-only Connects (APNs-style clients, which sign their
nonce alone): a nonce is accepted once, and remembered until it would be stale anyway.
A pushd device's Connect is bound to its TLS connection instead and never comes here.

``MemoryReplayCache`` serves one gateway process; a cluster backs ``IReplayCache`` with
Redis so that a Connect replayed to another node is refused too.
"""

from __future__ import annotations

import hashlib
import heapq

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pushd.store.interfaces import IReplayCache, ReplayCacheFull

#: Nonces remembered at most. An entry lives until its nonce is stale (at most 600 s:
#: a nonce may be dated up to 300 s ahead), so this allows ~170 nonce-only Connects a
#: second, sustained, for ~19 MB when full (measured: ~190 bytes an entry, key included).
DEFAULT_SIZE = 100_000


def nonce_key(device_id: str, nonce: bytes) -> bytes:
    """
    16 bytes naming one (device, nonce), compact in memory and in Redis. The nonce, not
    the signature: an ECDSA signature (r, s) has a second valid form (r, n - s), so a
    replayer could present the same Connect under a signature never seen before.
    """
    return hashlib.blake2b(device_id.encode("ascii") + nonce, digest_size=16).digest()


@implementer(IReplayCache)
class MemoryReplayCache:
    """
    Bounded in entries. When full it refuses (ReplayCacheFull): forgetting a live nonce
    to make room would let its Connect be replayed. Entries expire by the injected
    clock, looked at on each call (no timer).
    """

    log = Logger()

    def __init__(self, max_entries: int = DEFAULT_SIZE, clock=None):
        if max_entries < 1:
            raise ValueError("a replay cache needs room for at least one nonce")
        if clock is None:
            from twisted.internet import reactor as clock
        self.max_entries = max_entries
        self.clock = clock
        self._until: dict = {}  # key -> expires_at
        self._heap: list = []  # (expires_at, key), one per key in _until
        #: Connects refused for want of room, in all, and since the last log line.
        self.refused_full = 0
        self._unreported = 0
        self._reported_at = None

    def __len__(self):
        return len(self._until)

    def _expire(self, now: float):
        heap, until = self._heap, self._until
        # An entry is live while now <= expires_at: verify_connect accepts its nonce
        # until then (|stamp - now| <= window), and not after.
        while heap and heap[0][0] < now:
            _, key = heapq.heappop(heap)
            del until[key]

    def seen(self, key: bytes, expires_at: float):
        now = self.clock.seconds()
        self._expire(now)
        if key in self._until:
            return defer.succeed(True)
        if len(self._until) >= self.max_entries:
            self._refused(now)
            return defer.fail(ReplayCacheFull(f"replay cache full ({self.max_entries} nonces)"))
        self._until[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return defer.succeed(False)

    def _refused(self, now: float):
        """Count, and log at most once a second: a flood must not become a log flood."""
        self.refused_full += 1
        self._unreported += 1
        if self._reported_at is None or now - self._reported_at >= 1.0:
            self.log.warn(
                "replay cache full ({size} nonces, --replay-cache-size): refused {n}"
                " nonce-only Connects since the last report",
                size=self.max_entries,
                n=self._unreported,
            )
            self._reported_at = now
            self._unreported = 0
