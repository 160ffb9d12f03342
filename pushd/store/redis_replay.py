"""
The replay caches of a cluster, on the RedisStore that its nodes share: the Connect replay
cache (nonce-only Connects, ``pushd.gateway.connect``) and the enrolment nonces
(``pushd.gateway.enrol``). In memory (``pushd.gateway.replay``) each node remembered only
what it had seen itself, so a Connect or an enrolment captured on node A and replayed to
node B was accepted; here every node asks the same Redis.

Keys, P the store's prefix, D a device id, N the cache's name (``replay``, ``enrol``)::

    P:N:nonces         ZSET nonce key (16 bytes, replay.nonce_key) -> expires_at: every live nonce
    P:{D}:N:nonces     ZSET the same, of one device (the per-device quota; Connects only)

Sorted sets rather than ``SET key 1 NX EXAT`` per nonce: they bound the cache as the memory
provider does, by live nonces in all and per device, counted exactly (a counter key with an
expiry would keep counting a device's expired nonces while it keeps connecting, and lock an
honest client out). One Lua script per call checks and records, so two nodes asked for the
same nonce at once cannot both answer "new". Each key gets an EXPIREAT past its last entry,
so a quiet device leaves nothing behind.

Redis down, slow or refusing: the call fails with StoreUnavailable after the store's
timeout, the Connect (or enrolment) is refused, never let through unchecked (fail closed),
and a line says so at most once a second.
"""

from __future__ import annotations

import math

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pushd.gateway.replay import DEFAULT_PER_DEVICE, DEFAULT_SIZE, TooManyNonces
from pushd.store.interfaces import IReplayCache, ReplayCacheFull, StoreUnavailable
from pushd.throttle import LogThrottle

#: Seconds an entry is kept past its expiry. Each node prunes by its own clock: a node
#: whose clock is ahead by s would forget a nonce s seconds before a node whose clock is
#: behind stops accepting it. NTP keeps nodes within milliseconds; this covers a node
#: that has drifted by up to a minute, and costs only that the per-device quota counts a
#: nonce a minute longer.
DEFAULT_SKEW = 60.0

# KEYS: all nonces[, the owner's nonces]
# ARGV: nonce key, expires_at, cut (entries below are stale), max entries, per owner
# Returns 1: seen before; 0: new, now remembered; 2: the cache is full; 3: the owner's quota is full.
_SEEN = b"""
local all, member, exp, cut = KEYS[1], ARGV[1], tonumber(ARGV[2]), '(' .. ARGV[3]
redis.call('ZREMRANGEBYSCORE', all, '-inf', cut)
if redis.call('ZSCORE', all, member) then return 1 end
if redis.call('ZCARD', all) >= tonumber(ARGV[4]) then return 2 end
local function add(key)
  redis.call('ZADD', key, exp, member)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('EXPIREAT', key, math.ceil(tonumber(last[2]) + tonumber(ARGV[6])))
end
local own = KEYS[2]
if own then
  redis.call('ZREMRANGEBYSCORE', own, '-inf', cut)
  if redis.call('ZCARD', own) >= tonumber(ARGV[5]) then return 3 end
  add(own)
end
add(all)
return 0
"""


def _num(value) -> bytes:
    return repr(float(value)).encode()


def _log_refused(counts, total, sample):
    RedisReplayCache.log.warn(
        "{name} cache at Redis refused {total} nonces since the last report: {counts}"
        " (last: {owner}: {why})",
        name=sample.get("name"), total=total, counts=counts, owner=sample.get("owner"), why=sample.get("why"),
    )


@implementer(IReplayCache)
class RedisReplayCache:
    """
    IReplayCache on a RedisStore, shared by every node on that Redis; bounded in live
    nonces (``max_entries``) and per owner (``per_owner``), as MemoryReplayCache.
    ``name`` keeps caches apart (``replay`` for Connects, ``enrol`` for enrolments).
    """

    log = Logger()

    def __init__(self, store, name: str = "replay", max_entries: int = DEFAULT_SIZE,
                 per_owner: int = DEFAULT_PER_DEVICE, clock=None, skew: float = DEFAULT_SKEW):
        if max_entries < 1 or per_owner < 1:
            raise ValueError("a replay cache needs room for at least one nonce (per device too)")
        if skew < 0:
            raise ValueError("skew must not be negative")
        self.store = store
        self.name = name
        self.max_entries = max_entries
        self.per_owner = per_owner
        self.clock = clock if clock is not None else store.reactor
        self.skew = skew
        self._prefix = store._prefix  # the store's key prefix (bytes): one namespace per deployment
        self._all = b"%s:%s:nonces" % (self._prefix, name.encode("ascii"))
        #: Calls refused for want of room, and for want of Redis (fail closed).
        self.refused_full = 0
        self.refused_unavailable = 0
        self.refusals = LogThrottle(self.clock, _log_refused)

    def _owned(self, owner: str) -> bytes:
        # The device's hash tag, as its other keys (pushd.store.redis).
        return b"%s:{%s}:%s:nonces" % (self._prefix, owner.encode("utf-8"), self.name.encode("ascii"))

    def seen(self, key: bytes, expires_at: float, owner=None):
        """IReplayCache.seen; ``owner`` (a device id) is held to ``per_owner`` live nonces."""
        keys = [self._all] if owner is None else [self._all, self._owned(owner)]
        cut = self.clock.seconds() - self.skew
        args = [key, _num(expires_at), _num(cut), b"%d" % self.max_entries, b"%d" % self.per_owner,
                b"%d" % math.ceil(self.skew + 1)]
        # RedisStore's one way to run a script (timeout, bounded queue, StoreUnavailable). With
        # --redis-wait N the nonce is accepted only once N replicas have it, as a push is: a
        # failover must not forget a nonce and so let its Connect be replayed.
        d = self.store._script(_SEEN, keys, args, wait=getattr(self.store, "wait", 0) > 0)
        return d.addCallbacks(self._answered, self._unavailable, (owner,), None, (owner,))

    def _answered(self, code, owner):
        code = int(code)
        if code in (0, 1):
            return code == 1
        if code == 2:
            return self._refuse(ReplayCacheFull(f"{self.name} cache full ({self.max_entries} nonces)"),
                                "cache full", owner)
        return self._refuse(TooManyNonces(f"device {owner} holds {self.per_owner} live nonces "
                                          f"(--replay-per-device)"), "per device", owner)

    def _unavailable(self, failure, owner):
        failure.trap(StoreUnavailable)
        # Fail closed: the caller refuses the Connect or enrolment; it is never let through.
        self.refused_unavailable += 1
        self.refusals.note("Redis unavailable: refused (fail closed)", name=self.name, owner=owner,
                           why=failure.getErrorMessage())
        return failure

    def _refuse(self, error, reason, owner):
        self.refused_full += 1
        self.refusals.note(reason, name=self.name, owner=owner, why=str(error))
        raise error

    def stop(self) -> None:
        """Log what is pending and leave no timer (the courier factory stopped)."""
        self.refusals.stop()
