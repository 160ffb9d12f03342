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
from pushd.throttle import LogThrottle

#: Nonces remembered at most. An entry lives until its nonce is stale (at most 600 s:
#: a nonce may be dated up to 300 s ahead), so this allows ~170 nonce-only Connects a
#: second, sustained, for ~19 MB when full (measured: ~190 bytes an entry, key included).
DEFAULT_SIZE = 100_000

#: Live nonces of one device at most. An honest client makes one Connect per connection,
#: a few a minute at worst (jittered backoff): 16 in 600 s is already a reconnect loop.
#: Without it one enrolled device filled all 100,000 entries in 600 s from 9 addresses
#: (20 connections a second each) and every nonce-only client was refused.
DEFAULT_PER_DEVICE = 16


class TooManyNonces(ReplayCacheFull):
    """One device holds its quota of live nonces: only that device is refused."""


def nonce_key(device_id: str, nonce: bytes) -> bytes:
    """
    16 bytes naming one (device, nonce), compact in memory and in Redis. The nonce, not
    the signature: an ECDSA signature (r, s) has a second valid form (r, n - s), so a
    replayer could present the same Connect under a signature never seen before.
    """
    return hashlib.blake2b(device_id.encode("ascii") + nonce, digest_size=16).digest()


def _log_refused(counts, total, sample):
    MemoryReplayCache.log.warn(
        "replay cache refused {total} nonce-only Connects since the last report: {counts}"
        " (last: device {device})",
        total=total, counts=counts, device=sample.get("device"),
    )


@implementer(IReplayCache)
class MemoryReplayCache:
    """
    Bounded in entries, and in entries per device (``owner``). When full it refuses
    (ReplayCacheFull; TooManyNonces for one device over its quota): forgetting a live
    nonce to make room would let its Connect be replayed. Entries expire by the injected
    clock, looked at on each call (no timer).
    """

    log = Logger()

    def __init__(self, max_entries: int = DEFAULT_SIZE, clock=None, per_owner: int = DEFAULT_PER_DEVICE):
        if max_entries < 1 or per_owner < 1:
            raise ValueError("a replay cache needs room for at least one nonce (per device too)")
        if clock is None:
            from twisted.internet import reactor as clock
        self.max_entries = max_entries
        self.per_owner = per_owner
        self.clock = clock
        self._until: dict = {}  # key -> expires_at
        self._heap: list = []  # (expires_at, key, owner), one per key in _until
        self._owned: dict = {}  # owner -> live entries (only owners with some)
        #: Connects refused for want of room (the cache's or one device's), in all.
        self.refused_full = 0
        self.refusals = LogThrottle(clock, _log_refused)

    def __len__(self):
        return len(self._until)

    def _expire(self, now: float):
        heap, until, owned = self._heap, self._until, self._owned
        # An entry is live while now <= expires_at: verify_connect accepts its nonce
        # until then (|stamp - now| <= window), and not after.
        while heap and heap[0][0] < now:
            _, key, owner = heapq.heappop(heap)
            del until[key]
            if owner is not None:
                n = owned[owner] - 1
                if n:
                    owned[owner] = n
                else:
                    del owned[owner]

    def seen(self, key: bytes, expires_at: float, owner=None):
        """IReplayCache.seen; ``owner`` (a device id) is held to ``per_owner`` live entries."""
        now = self.clock.seconds()
        self._expire(now)
        if key in self._until:
            return defer.succeed(True)
        if len(self._until) >= self.max_entries:
            return self._refuse(
                ReplayCacheFull(f"replay cache full ({self.max_entries} nonces)"), "cache full", owner)
        if owner is not None:
            n = self._owned.get(owner, 0)
            if n >= self.per_owner:
                return self._refuse(TooManyNonces(
                    f"device {owner} holds {n} live nonces (--replay-per-device)"), "per device", owner)
            self._owned[owner] = n + 1
        self._until[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key, owner))
        return defer.succeed(False)

    def _refuse(self, error, reason, owner):
        """Counted, and logged at most once a second: a flood must not become a log flood."""
        self.refused_full += 1
        self.refusals.note(reason, device=owner)
        return defer.fail(error)

    def stop(self) -> None:
        """Log what is pending and leave no timer (the courier factory stopped)."""
        self.refusals.stop()
