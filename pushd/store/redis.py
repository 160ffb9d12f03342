"""
A store that several gateway nodes can share: one Redis server.

Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync always`` so that an
enqueue which has fired survives a crash of Redis. Every operation that touches more than
one key is one Lua script, so Redis applies it whole or not at all and no other client sees
it half done. A caller never waits on Redis longer than ``timeout``: down, frozen or slow,
the answer is StoreUnavailable, and txredisapi reconnects behind it.

Keys, with P the prefix, D a device id and B = "P:{D}:" (a device's keys share a hash tag)::

    P:{D}:seq          INCR counter: acceptance order, kept in Redis so it survives restarts
    P:{D}:o            ZSET message id -> seq: every message of the device
    P:{D}:t:<th>       ZSET message id -> seq: the messages of one topic hash (for the cap)
    P:{D}:m:<id>       HASH: one message's fields
    P:{D}:c            HASH len(th):th + collapse id -> message id: the collapsible ones
    P:{D}:node         STRING "<node> <epoch>": the node holding the device's live session
                       (no TTL: it counts only while P:node:<node> lives; docs/cluster.md)
    P:expiry           ZSET len(B):B + message id -> expiry, for messages with an expiry
    P:pending          count of messages stored (all devices)
    P:dropped          count of messages dropped by the per-topic cap
    P:invalid          HASH token -> invalidation time
    P:node:<node>      STRING with a TTL (--node-ttl): the node's heartbeat, SET every
                       --node-heartbeat seconds (pushd.store.redisbus)

Channels (PUB/SUB, one per node; pushd.gateway.cluster encodes the messages)::

    P:bus:<node>       wakes (device ids), kicks (device id, epoch), probes; the node
                       SUBSCRIBEs to its own, the others PUBLISH on it

A device's message keys go with its last message. The scripts build per-message and
per-topic key names themselves and the global keys live outside any hash tag, so this
targets a single Redis instance, not Cluster.
"""

from __future__ import annotations

import os
import struct

from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pushd.store.interfaces import (
    Enqueued,
    IMessageStore,
    IPresence,
    ITokenRegistry,
    Owner,
    StoredMessage,
    StoreUnavailable,
    topic_scoped_id,
)

# Shared by the message scripts: one place that knows every index a message is in.
_LIB = """
local function xmember(base, mid) return string.len(base) .. ':' .. base .. mid end
local function cfield(th, cid) return string.len(th) .. ':' .. th .. cid end

-- Delete one message and its entries in every index; 1 if it was there.
local function remove(base, mid, expiry)
  local key = base .. 'm:' .. mid
  local f = redis.call('HMGET', key, 'th', 'cid', 'exp')
  if not f[1] then return 0 end
  redis.call('DEL', key)
  redis.call('ZREM', base .. 'o', mid)
  redis.call('ZREM', base .. 't:' .. f[1], mid)
  if f[2] then
    local cf = cfield(f[1], f[2])
    if redis.call('HGET', base .. 'c', cf) == mid then redis.call('HDEL', base .. 'c', cf) end
  end
  if tonumber(f[3]) > 0 then redis.call('ZREM', expiry, xmember(base, mid)) end
  return 1
end

-- The device's owner "<node> <epoch>" if that node's heartbeat key lives, else nil.
local function live_owner(key, beats)
  local owner = redis.call('GET', key)
  if not owner then return nil end
  local sp = string.find(owner, ' ', 1, true)
  if sp and redis.call('EXISTS', beats .. string.sub(owner, 1, sp - 1)) == 1 then return owner end
  return nil
end

-- A device without messages leaves no keys behind (Redis drops empty zsets and hashes).
local function tidy(base)
  if redis.call('EXISTS', base .. 'o') == 0 then redis.call('DEL', base .. 'seq') end
end
"""

# KEYS: expiry, pending, dropped, invalid tokens, the device's owner
# ARGV: base, id, token, topic, th, payload, expiry, priority, received, per_topic,
#       topic-scoped id, random id, heartbeat key prefix[, collapse id]
# Returns {1, since} (nothing stored) for an invalidated token, else {0, dropped[, owner]}
# with the owner ("<node> <epoch>") if its node's heartbeat is alive: the wake's address
# in the same round trip.
# Replaces by id only within the topic; the id another topic holds is left to it
# (IMessageStore.enqueue).
_ENQUEUE = _LIB + """
local since = redis.call('HGET', KEYS[4], ARGV[3])
if since then return {1, since} end
local base, mid, th, scoped = ARGV[1], ARGV[2], ARGV[5], ARGV[11]
local gone = 0
for _, id in ipairs({mid, scoped}) do
  if redis.call('HGET', base .. 'm:' .. id, 'th') == th then gone = gone + remove(base, id, KEYS[1]) end
end
if redis.call('EXISTS', base .. 'm:' .. mid) == 1 then
  if redis.call('EXISTS', base .. 'm:' .. scoped) == 0 then mid = scoped else mid = ARGV[12] end
end
local cid = ARGV[14]
if cid then
  local cf = cfield(th, cid)
  local old = redis.call('HGET', base .. 'c', cf)
  if old then gone = gone + remove(base, old, KEYS[1]) end
  redis.call('HSET', base .. 'c', cf, mid)
end
local seq = redis.call('INCR', base .. 'seq')
local key = base .. 'm:' .. mid
redis.call('HSET', key, 'token', ARGV[3], 'topic', ARGV[4], 'th', th, 'payload', ARGV[6],
           'exp', ARGV[7], 'pri', ARGV[8], 'rcv', ARGV[9])
if cid then redis.call('HSET', key, 'cid', cid) end
redis.call('ZADD', base .. 'o', seq, mid)
local topic = base .. 't:' .. th
redis.call('ZADD', topic, seq, mid)
if tonumber(ARGV[7]) > 0 then redis.call('ZADD', KEYS[1], ARGV[7], xmember(base, mid)) end
local over = redis.call('ZCARD', topic) - tonumber(ARGV[10])
local dropped = 0
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', topic, 0, over - 1)) do
    dropped = dropped + remove(base, old, KEYS[1])
  end
  redis.call('INCRBY', KEYS[3], dropped)
end
redis.call('INCRBY', KEYS[2], 1 - gone - dropped)
tidy(base)
local owner = live_owner(KEYS[5], ARGV[13])
if owner then return {0, dropped, owner} end
return {0, dropped}
"""

# ARGV: base, now, limit, topic hashes...
# Reads up to limit live messages from each wanted topic and merges them by seq, so the
# device's other topics cost nothing.
_PENDING = """
local base, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local picked = {}
for i = 4, #ARGV do
  local topic, found, start = base .. 't:' .. ARGV[i], 0, 0
  while found < limit do
    local page = redis.call('ZRANGE', topic, start, start + limit - 1, 'WITHSCORES')
    if #page == 0 then break end
    for j = 1, #page, 2 do
      local exp = tonumber(redis.call('HGET', base .. 'm:' .. page[j], 'exp'))
      if exp and (exp == 0 or exp >= now) then
        picked[#picked + 1] = {tonumber(page[j + 1]), page[j]}
        found = found + 1
        if found == limit then break end
      end
    end
    start = start + limit
  end
end
table.sort(picked, function(a, b) return a[1] < b[1] end)
-- One bulk string of length-prefixed fields, not nested arrays: the gateway then parses one
-- reply per call, not nine per message (txredisapi's reply parser is Python, line by line).
local out = {}
for i = 1, math.min(limit, #picked) do
  local mid = picked[i][2]
  local f = redis.call('HMGET', base .. 'm:' .. mid,
                       'token', 'topic', 'th', 'payload', 'exp', 'pri', 'cid', 'rcv')
  out[#out + 1] = struct.pack('>I4', #mid) .. mid
  for k = 1, 8 do
    local v = f[k]
    if v then
      out[#out + 1] = struct.pack('>I4', #v) .. v
    else
      out[#out + 1] = struct.pack('>I4', 4294967295)  -- absent (no collapse id)
    end
  end
end
return table.concat(out)
"""

# KEYS: expiry, pending; ARGV: base, id
_ACK = _LIB + """
local n = remove(ARGV[1], ARGV[2], KEYS[1])
if n > 0 then
  redis.call('DECR', KEYS[2])
  tidy(ARGV[1])
end
return n
"""

# KEYS: expiry, pending; ARGV: base, message ids...
_ACK_MANY = _LIB + """
local n = 0
for i = 2, #ARGV do n = n + remove(ARGV[1], ARGV[i], KEYS[1]) end
if n > 0 then
  redis.call('DECRBY', KEYS[2], n)
  tidy(ARGV[1])
end
return n
"""

# KEYS: expiry, pending; ARGV: now, batch. Returns {deleted, index entries looked at}.
_EXPIRE = _LIB + """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local n = 0
for _, member in ipairs(members) do
  local colon = string.find(member, ':', 1, true)
  local len = tonumber(string.sub(member, 1, colon - 1))
  local base = string.sub(member, colon + 1, colon + len)
  local gone = remove(base, string.sub(member, colon + len + 1), KEYS[1])
  if gone == 0 then redis.call('ZREM', KEYS[1], member) end
  n = n + gone
  tidy(base)
end
if n > 0 then redis.call('DECRBY', KEYS[2], n) end
return {n, #members}
"""

# KEYS: the device's owner; ARGV: "<node> <epoch>", heartbeat key prefix
# Returns the owner before if it is another live one (to be kicked), else nil.
_CLAIM = _LIB + """
local before = live_owner(KEYS[1], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
if before == ARGV[1] then return nil end
return before
"""

# KEYS: the device's owner; ARGV: "<node> <epoch>"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the device's owner; ARGV: heartbeat key prefix
_WHERE = _LIB + """
return live_owner(KEYS[1], ARGV[1])
"""

_ENQUEUE, _PENDING, _ACK, _ACK_MANY, _EXPIRE, _CLAIM, _RELEASE, _WHERE = (
    s.encode() for s in (_ENQUEUE, _PENDING, _ACK, _ACK_MANY, _EXPIRE, _CLAIM, _RELEASE, _WHERE)
)


def parse_url(url: str):
    """redis://[[user]:password@]host[:port][/db] -> (host, port, db, user, password)."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"Redis URL {url!r}: the scheme must be redis:// (TLS and unix sockets are not supported)")
    if not parts.hostname:
        raise ValueError(f"Redis URL {url!r} has no host")
    try:
        port = parts.port if parts.port is not None else 6379
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ValueError(f"Redis URL {url!r}: the port must be a number from 1 to 65535")
    path = parts.path.strip("/")
    if not path:
        db = 0
    elif path.isdigit():
        db = int(path)
    else:
        raise ValueError(f"Redis URL {url!r}: the path must be a database number, as in /0")
    if parts.query or parts.fragment:
        raise ValueError(f"Redis URL {url!r}: query strings and fragments are not supported")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, db, user, password


_LEN = struct.Struct(">I")
_ABSENT = 0xFFFFFFFF


def _unpack(blob) -> list:
    """_PENDING's reply: messages of nine length-prefixed fields each."""
    rows, fields, pos, n = [], [], 0, len(blob or b"")
    while pos < n:
        (size,) = _LEN.unpack_from(blob, pos)
        pos += 4
        if size == _ABSENT:
            fields.append(None)
        else:
            fields.append(blob[pos:pos + size])
            pos += size
        if len(fields) == 9:
            rows.append(fields)
            fields = []
    if fields or pos != n:
        raise StoreUnavailable("Redis returned a malformed pending list")
    return rows


def _num(value) -> bytes:
    # repr() of a float reads back as the same float; ints as themselves.
    return repr(value).encode() if isinstance(value, float) else b"%d" % value


def _check(m: StoredMessage) -> None:
    # txredisapi sends str() of anything; refuse to store b"None" for a missing payload.
    for name, kind in (("message_id", bytes), ("token", bytes), ("topic_hash", bytes), ("payload", bytes),
                       ("topic", str), ("collapse_id", (str, type(None))), ("expiry", int),
                       ("priority", int), ("received", (int, float))):
        if not isinstance(getattr(m, name), kind):
            raise TypeError(f"StoredMessage.{name} cannot be {type(getattr(m, name)).__name__}")


@implementer(IMessageStore, ITokenRegistry, IPresence)
class RedisStore:
    log = Logger()

    #: Callers waiting for an answer before new ones are refused at once: bounds memory
    #: while Redis is slow.
    max_queue = 20000
    max_inflight = 256
    #: Expired messages deleted per script run, so that a purge never blocks Redis long.
    expire_batch = 1000

    def __init__(self, url="redis://127.0.0.1:6379/0", per_topic=1000, reactor=None, prefix="pushd",
                 timeout=5.0, poolsize=4):
        if reactor is None:
            from twisted.internet import reactor
        host, port, db, user, password = parse_url(url)
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if not isinstance(poolsize, int) or poolsize < 1:
            raise ValueError("poolsize must be a positive integer")
        self.per_topic = per_topic
        self.reactor = reactor
        self.timeout = timeout
        self.url = url
        self.address = f"{host}:{port}/{db}"
        self._prefix = prefix.encode("utf-8")
        self._expiry = self._prefix + b":expiry"
        self._pending = self._prefix + b":pending"
        self._dropped = self._prefix + b":dropped"
        self._invalid = self._prefix + b":invalid"
        #: Heartbeat keys are this + node id; nodes' channels ``channel_prefix`` + node id.
        self.beat_prefix = self._prefix + b":node:"
        self.channel_prefix = self._prefix + b":bus:"
        self._calls: set = set()  # callers' Deferreds not yet answered
        self._slots = defer.DeferredSemaphore(self.max_inflight)
        self._tails: dict = {}  # device -> (Deferred its operations run on, how many)
        self._closing = None
        self._retiring: list = []  # disconnect() Deferreds of pools replaced
        self._pool_since = reactor.seconds()
        self._down_since = None  # when an operation first found no connection
        self._pool_args = {
            "host": host,
            "port": port,
            "poolsize": poolsize,
            "charset": None,
            "convertNumbers": False,
            # Every connection starts on db 0: not selecting it spares a round trip, and
            # txredisapi's give-up-for-good when a connection drops during its SELECT.
            "dbid": db or None,
            "password": password.encode("utf-8") if password is not None else None,
            "username": user.encode("utf-8") if user else None,
            "connectTimeout": timeout,
        }
        self._pool = self._connect()

    def _connect(self):
        pool = txredisapi.lazyConnectionPool(**self._pool_args)
        # Fires once the pool is full, or fails if it gives up; nobody else listens to it.
        pool._factory.deferred.addErrback(
            lambda f: self.log.warn("Redis at {address}: {why}", address=self.address, why=f.getErrorMessage())
        )
        return pool

    # --- talking to Redis ----------------------------------------------------------------

    def _call(self, op, device=None):
        """
        Run ``op(connection)`` and fire with its result, or with StoreUnavailable after
        ``timeout`` seconds, whatever Redis does.

        A device's operations run one after the other: the pool's connections race each
        other, and a release must not overtake its claim, nor a pending read the ack
        before it. So the caller gets its own Deferred, timed out on its own, and the
        device's next operation goes once this one is answered or given up. One whose
        caller has given up before it is sent is skipped, so an enqueue refused during an
        outage does not land when Redis comes back; one already sent may still be applied
        (a timeout cannot tell).
        """
        if self._closing is not None:
            return defer.fail(StoreUnavailable("the Redis store is closed"))
        if len(self._calls) >= self.max_queue:
            return defer.fail(StoreUnavailable(f"{len(self._calls)} operations are waiting for Redis at {self.address}"))
        result = defer.Deferred()
        sent = []  # the connection the command went out on
        self._calls.add(result)
        result.addTimeout(self.timeout, self.reactor, onTimeoutCancel=lambda r, t: self._timedOut(r, sent))
        result.addBoth(self._answered, result)
        result.addErrback(self._unavailable)
        turn = defer.Deferred()  # fires when the device's next operation may go

        def go(_):
            self._send(op, result, sent).addBoth(answer)
            return turn

        def answer(outcome):
            if not result.called:
                result.callback(outcome) if not isinstance(outcome, Failure) else result.errback(outcome)
            # Otherwise the caller has had its answer (a timeout): this late one, failure
            # or not, goes nowhere.

        def next_turn(outcome):
            turn.callback(None)
            return outcome

        result.addBoth(next_turn)
        if device is None:
            go(None)
        else:
            chain, n = self._tails.get(device, (None, 0))
            if chain is None:
                chain = defer.succeed(None)
            self._tails[device] = (chain, n + 1)
            chain.addCallback(go).addCallback(self._turned, device)
        return result

    def _turned(self, _, device):
        chain, n = self._tails[device]
        if n == 1:
            del self._tails[device]
        else:
            self._tails[device] = (chain, n - 1)

    @defer.inlineCallbacks
    def _send(self, op, result, sent):
        if result.called:
            return None
        # At most max_inflight commands are with Redis at once; the rest wait here. A burst
        # (10,000 devices sending Filter together) then cannot queue so much inside Redis
        # that the commands sent first outlive the timeout and get their connection dropped.
        yield self._slots.acquire()
        try:
            if result.called:
                return None
            conn = yield self._connection()
            if result.called:
                return None
            sent.append(conn)
            return (yield op(conn))
        finally:
            self._slots.release()

    def _connection(self):
        if self._closing is not None:
            return defer.fail(StoreUnavailable("the Redis store is closed"))
        now = self.reactor.seconds()
        factory = self._pool._factory
        if factory.stopped and now - self._pool_since >= self.timeout:
            # txredisapi stops reconnecting for good when a connection is lost during its
            # AUTH or SELECT (Redis going down at that moment, maxclients, a wrong password):
            # start over, at most once per timeout.
            self.log.warn("Redis at {address}: the connection pool gave up; starting a new one",
                          address=self.address)
            old, self._pool, self._pool_since = self._pool, self._connect(), now
            self._down_since = None
            factory = self._pool._factory
            retiring = old.disconnect()
            self._retiring.append(retiring)
            retiring.addBoth(lambda r: self._retiring.remove(retiring) or r)
        if factory.size:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
        elif now - self._down_since >= self.timeout:
            # Down for longer than a caller waits: say so at once rather than pile up
            # waiters (and their payloads) for the whole outage.
            return defer.fail(StoreUnavailable(f"no connection to Redis at {self.address} "
                                               f"for {now - self._down_since:.0f}s"))
        return factory.getConnection(peek=True)

    def _answered(self, outcome, result):
        self._calls.discard(result)
        return outcome

    def _timedOut(self, outcome, sent):
        if sent and sent[0].connected:
            # Sent and not answered: the connection may be half-open (Redis's host gone
            # without a reset), which nothing else would notice for many minutes. Drop it
            # so that txredisapi connects again.
            self.log.warn("Redis at {address} did not answer in {timeout}s; reconnecting",
                          address=self.address, timeout=self.timeout)
            sent[0].transport.abortConnection()
        return Failure(StoreUnavailable(f"Redis at {self.address} did not answer within {self.timeout:g}s"))

    def _unavailable(self, failure):
        if failure.check(txredisapi.ConnectionError):  # TimeoutError too
            raise StoreUnavailable(f"Redis at {self.address}: {failure.getErrorMessage()}")
        if failure.check(txredisapi.ResponseError):  # LOADING, OOM, MISCONF, BUSY...
            raise StoreUnavailable(f"Redis at {self.address} refused: {failure.getErrorMessage()}")
        return failure

    def _script(self, script, keys, args, device=None):
        return self._call(lambda conn: conn.eval(script, keys, args), device)

    def _command(self, *args, device=None):
        return self._call(lambda conn: conn.execute_command(*args), device)

    def _base(self, device_id: str) -> bytes:
        return b"%s:{%s}:" % (self._prefix, device_id.encode("utf-8"))

    def close(self):
        if self._closing is None:
            pools = [self._pool.disconnect(), *self._retiring]
            self._closing = defer.gatherResults(pools, consumeErrors=True)
            self._closing.addErrback(lambda f: self.log.failure("closing the Redis pool", f))
            for d in list(self._calls):
                if not d.called:  # answering one may have let the device's next one fail
                    d.errback(StoreUnavailable("the Redis store is closed"))
        done = defer.Deferred()

        def fire(r):
            done.callback(None)
            return r

        self._closing.addBoth(fire)
        return done

    # --- messages ------------------------------------------------------------------------

    def enqueue(self, m):
        try:
            _check(m)
        except TypeError:
            return defer.fail()
        args = [self._base(m.device_id), m.message_id, m.token, m.topic.encode("utf-8"), m.topic_hash,
                m.payload, _num(m.expiry), _num(m.priority), _num(float(m.received)), _num(self.per_topic),
                topic_scoped_id(m.message_id, m.topic_hash), os.urandom(16), self.beat_prefix]
        if m.collapse_id is not None:
            args.append(m.collapse_id.encode("utf-8"))
        base = args[0]
        d = self._script(_ENQUEUE, [self._expiry, self._pending, self._dropped, self._invalid, base + b"node"],
                         args, m.device_id)
        return d.addCallback(self._enqueued)

    @staticmethod
    def _enqueued(r):
        if int(r[0]):
            return Enqueued(invalidated=float(r[1]))
        return Enqueued(owner=_owner(r[2]) if len(r) > 2 else None)

    def pending(self, device_id, topic_hashes, limit, now):
        hashes = sorted(set(topic_hashes))
        if not hashes or limit <= 0:
            return defer.succeed([])
        d = self._script(_PENDING, [], [self._base(device_id), _num(now), _num(limit), *hashes], device_id)
        return d.addCallback(lambda blob: [self._message(device_id, row) for row in _unpack(blob)])

    @staticmethod
    def _message(device_id, row):
        mid, token, topic, th, payload, expiry, priority, collapse_id, received = row
        return StoredMessage(
            message_id=mid,
            device_id=device_id,
            token=token,
            topic=topic.decode("utf-8"),
            topic_hash=th,
            payload=payload,
            expiry=int(expiry),
            priority=int(priority),
            collapse_id=collapse_id.decode("utf-8") if collapse_id is not None else None,
            received=float(received),
        )

    def ack(self, device_id, message_id):
        d = self._script(_ACK, [self._expiry, self._pending], [self._base(device_id), message_id], device_id)
        return d.addCallback(lambda n: int(n) > 0)

    def ack_many(self, device_id, message_ids):
        ids = list(message_ids)
        if not ids:
            return defer.succeed(0)
        d = self._script(_ACK_MANY, [self._expiry, self._pending], [self._base(device_id), *ids], device_id)
        return d.addCallback(int)

    @defer.inlineCallbacks
    def expire(self, now):
        total = 0
        while True:
            gone, seen = yield self._script(_EXPIRE, [self._expiry, self._pending], [_num(now), _num(self.expire_batch)])
            total += int(gone)
            if int(seen) < self.expire_batch:
                return total

    def counters(self):
        d = self._command(b"MGET", self._pending, self._dropped)
        return d.addCallback(lambda v: {"pending": int(v[0] or 0), "dropped": int(v[1] or 0)})

    # --- tokens ----------------------------------------------------------------------------

    def invalidate(self, token, when):
        return self._command(b"HSET", self._invalid, token, _num(float(when))).addCallback(lambda _: None)

    def invalidated(self, token):
        d = self._command(b"HGET", self._invalid, token)
        return d.addCallback(lambda v: float(v) if v is not None else None)

    def revalidate(self, token):
        return self._command(b"HDEL", self._invalid, token).addCallback(lambda _: None)

    # --- presence --------------------------------------------------------------------------

    def claim(self, device_id, node, epoch):
        d = self._script(_CLAIM, [self._base(device_id) + b"node"], [_presence(node, epoch), self.beat_prefix],
                         device_id)
        return d.addCallback(_owner)

    def release(self, device_id, node, epoch):
        d = self._script(_RELEASE, [self._base(device_id) + b"node"], [_presence(node, epoch)], device_id)
        return d.addCallback(lambda _: None)

    def where(self, device_id):
        d = self._script(_WHERE, [self._base(device_id) + b"node"], [self.beat_prefix], device_id)
        return d.addCallback(_owner)


def _presence(node: str, epoch: int) -> bytes:
    return b"%s %d" % (node.encode("utf-8"), epoch)


def _owner(value):
    """A presence value read back: "<node> <epoch>" -> Owner (None stays None)."""
    if value is None:
        return None
    node, _, epoch = value.rpartition(b" ")
    return Owner(node.decode("utf-8"), int(epoch))
