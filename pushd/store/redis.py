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

import collections
import hashlib
import os
import re
import struct

from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pushd._lowlevel import txredis
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
-- One bulk string, not nested arrays: per message a header of its nine field lengths, then
-- the fields. The gateway unpacks the header in one call and slices (absent: 2^32-1, no bytes).
local out = {}
for i = 1, math.min(limit, #picked) do
  local mid = picked[i][2]
  local f = redis.call('HMGET', base .. 'm:' .. mid,
                       'token', 'topic', 'th', 'payload', 'exp', 'pri', 'cid', 'rcv')
  local cid = f[7]
  out[#out + 1] = struct.pack('>I4I4I4I4I4I4I4I4I4', #mid, #f[1], #f[2], #f[3], #f[4], #f[5], #f[6],
                              cid and #cid or 4294967295, #f[8])
  out[#out + 1] = mid .. f[1] .. f[2] .. f[3] .. f[4] .. f[5] .. f[6] .. (cid or '') .. f[8]
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

_RELEASE_ALL = """
local mine = ARGV[1] .. ' '
local n = 0
for _, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v and string.sub(v, 1, string.len(mine)) == mine then n = n + redis.call('DEL', key) end
end
return n
"""

# KEYS: the device's owner; ARGV: heartbeat key prefix
_WHERE = _LIB + """
return live_owner(KEYS[1], ARGV[1])
"""

_ENQUEUE, _PENDING, _ACK, _ACK_MANY, _EXPIRE, _CLAIM, _RELEASE, _RELEASE_ALL, _WHERE = (
    s.encode() for s in (_ENQUEUE, _PENDING, _ACK, _ACK_MANY, _EXPIRE, _CLAIM, _RELEASE, _RELEASE_ALL, _WHERE)
)
#: Keys per release_all script: a drain of 17,000 devices is 17 calls, none holding Redis long.
RELEASE_CHUNK = 1000


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


def parse_sentinel_url(url: str):
    """
    redis-sentinel://[[user]:password@]host:port[,host:port...]/master[/db]
    -> ([(host, port), ...], master, db, user, password). The password is the master's
    (and its replicas'); the sentinels are asked without one.
    """
    scheme, sep, rest = url.partition("://")
    if scheme != "redis-sentinel" or not sep:
        raise ValueError(f"Redis URL {url!r}: the scheme must be redis-sentinel://")
    if "?" in rest or "#" in rest:
        raise ValueError(f"Redis URL {url!r}: query strings and fragments are not supported")
    hosts, _, path = rest.partition("/")
    user = password = None
    if "@" in hosts:
        userinfo, _, hosts = hosts.rpartition("@")
        name, colon, secret = userinfo.partition(":")
        user = unquote(name) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):(\d{1,5})", item)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"Redis URL {url!r}: {item!r} is not a sentinel HOST:PORT (port 1 to 65535)")
        sentinels.append((m.group(1).strip("[]"), int(m.group(2))))
    segments = path.strip("/").split("/") if path.strip("/") else []
    if not segments or not segments[0]:
        raise ValueError(f"Redis URL {url!r} names no master: add /MASTER-NAME after the sentinels")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError(f"Redis URL {url!r}: after the master name only a database number may follow, as in /0")
    db = int(segments[1]) if len(segments) == 2 else 0
    return sentinels, unquote(segments[0]), db, user, password


_HEAD = struct.Struct(">9I")
_ABSENT = 0xFFFFFFFF


def _unpack(blob) -> list:
    """_PENDING's reply: per message nine field lengths, then the nine fields."""
    rows, pos, n = [], 0, len(blob or b"")
    head, absent = _HEAD, _ABSENT
    try:
        while pos < n:
            lens = head.unpack_from(blob, pos)
            pos += 36
            row = []
            for size in lens:
                if size == absent:
                    row.append(None)
                else:
                    end = pos + size
                    row.append(blob[pos:end])
                    pos = end
            rows.append(row)
    except struct.error:
        pos = -1
    if pos != n:
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


def _encode(*args) -> bytes:
    """One command in Redis's protocol (RESP): every argument is bytes already."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


_SHA: dict = {}


def _sha(script: bytes) -> bytes:
    sha = _SHA.get(script)
    if sha is None:
        sha = _SHA[script] = hashlib.sha1(script).hexdigest().encode()
    return sha


class _Op:
    """
    One store operation: its command, its caller's Deferred, where and when it was sent. It
    waits for its reply itself (``callback``, in the connection's reply queue), not through
    a Deferred of its own: two Deferreds and their callbacks fewer per operation.
    """

    __slots__ = ("store", "script", "args", "nkeys", "device", "result", "deadline", "conn", "wait", "reply")

    def __init__(self, store, script, args, nkeys, device, deadline, wait):
        self.store, self.script, self.args, self.nkeys, self.device = store, script, args, nkeys, device
        self.deadline, self.wait = deadline, wait
        self.result = defer.Deferred()
        self.conn = self.reply = None

    def callback(self, reply):
        """A reply (an Exception instance for an error or a lost connection), in send order."""
        if self.wait and self.reply is None:
            self.reply = (reply,)  # the enqueue's; WAIT's comes next
            return
        self.store._replied(self, reply)


class _ScriptLoaded:
    """Waits for a SCRIPT LOAD's reply: on an error the script is loaded again on next use."""

    __slots__ = ("loaded", "sha")

    def __init__(self, loaded, sha):
        self.loaded, self.sha = loaded, sha

    def callback(self, reply):
        if isinstance(reply, Exception):
            self.loaded.discard(self.sha)


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
                 timeout=5.0, poolsize=4, wait=0):
        if reactor is None:
            from twisted.internet import reactor
        if url.startswith("redis-sentinel://"):
            sentinels, master, db, user, password = parse_sentinel_url(url)
            self.address = f"the master {master!r} of the sentinels at " + ",".join(f"{h}:{p}" for h, p in sentinels)
            self._target = ("sentinel", sentinels, master)
        else:
            host, port, db, user, password = parse_url(url)
            self.address = f"{host}:{port}/{db}"
            self._target = ("plain", host, port)
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if not isinstance(poolsize, int) or poolsize < 1:
            raise ValueError("poolsize must be a positive integer")
        if not isinstance(wait, int) or wait < 0:
            raise ValueError("--redis-wait must be a whole number of replicas, 0 or more")
        self.per_topic = per_topic
        self.reactor = reactor
        self.timeout = timeout
        self.url = url
        #: Replicas that must have an accepted push before it is answered (WAIT); 0: none.
        self.wait = wait
        # WAIT's own limit: half the store timeout, so that WAIT answers (with fewer replicas)
        # before the store gives up on the connection.
        self._wait_command = _encode(b"WAIT", b"%d" % wait, b"%d" % max(1, int(timeout * 500))) if wait else b""
        self._prefix = prefix.encode("utf-8")
        self._expiry = self._prefix + b":expiry"
        self._pending = self._prefix + b":pending"
        self._dropped = self._prefix + b":dropped"
        self._invalid = self._prefix + b":invalid"
        #: Heartbeat keys are this + node id; nodes' channels ``channel_prefix`` + node id.
        self.beat_prefix = self._prefix + b":node:"
        self.channel_prefix = self._prefix + b":bus:"
        self._waiting = collections.deque()  # operations not sent yet, in call order
        self._sent: dict = {}  # connection -> deque of its operations not answered, in send order
        self._inflight = 0
        self._pins: dict = {}  # device -> [connection, operations of it there not answered]
        self._loaded: dict = {}  # connection -> script hashes loaded on it
        self._next = 0  # round robin over the connections
        self._timer = None
        self._tick = min(timeout / 8, 0.25)
        self._listeners: list = []  # called when the connection to the master is (re)established
        self._master = None  # (host, port) of the last connection made
        self._closing = None
        self._retiring: list = []  # disconnect() Deferreds of pools replaced
        self._pool_since = reactor.seconds()
        self._down_since = None  # when an operation first found no connection
        self._pool_args = {
            "poolsize": poolsize,
            # Every connection starts on db 0: not selecting it spares a round trip, and
            # txredisapi's give-up-for-good when a connection drops during its SELECT.
            "dbid": db or None,
            "password": password.encode("utf-8") if password is not None else None,
            "username": user.encode("utf-8") if user else None,
            "connect_timeout": timeout,
            "on_connection": self._connected,
        }
        self._pool = self._connect()

    def _connect(self):
        if self._target[0] == "sentinel":
            pool = txredis.sentinel_pool(self._target[1], self._target[2], discovery_timeout=self.timeout,
                                         **self._pool_args)
        else:
            pool = txredis.plain_pool(self.reactor, self._target[1], self._target[2], **self._pool_args)
        # Fires if the pool gives up before it is full; nobody else listens to it.
        pool.on_failure(
            lambda f: self.log.warn("Redis at {address}: {why}", address=self.address, why=f.getErrorMessage())
        )
        return pool

    # --- the master's connection ------------------------------------------------------------

    def on_master(self, callback):
        """
        Call ``callback()`` each time the connection to the master is (re)established: at
        start, after Redis came back, after a Sentinel failover to another master. What a
        node holds only while connected (a SUBSCRIBE, sessions' queue reads that may have
        missed a wake) is to be set up again there. Returns a function that unregisters.
        """
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    @property
    def master(self):
        """(host, port) of the server the pool last connected to (with Sentinel: the master
        it named), or None before the first connection: where a subscriber connects too."""
        return self._master

    def _connected(self, conn):
        """A pool connection is ready (txredisapi's hook, pushd._lowlevel.txredis)."""
        if self._closing is not None:
            return
        peer = conn.transport.getPeer()
        where = (getattr(peer, "host", None), getattr(peer, "port", None))
        first = len(self._pool.connections()) == 1
        moved = self._master is not None and where != self._master
        self._master = where
        self._down_since = None
        self._dispatch()
        if first or moved:
            self.log.info("Redis at {address}: connected to {host}:{port}", address=self.address,
                          host=where[0], port=where[1])
            for callback in list(self._listeners):
                try:
                    callback()
                except Exception:
                    self.log.failure("a Redis (re)connection listener failed")

    # --- talking to Redis ----------------------------------------------------------------

    def _call(self, script, args, nkeys=0, device=None, wait=False):
        """
        Send a command (``script`` None: ``args`` is the command) or run a script, and fire
        with its reply, or with StoreUnavailable after ``timeout`` seconds, whatever Redis does.

        A device's operations apply in the order they were called: while one of them is
        unanswered the next go out on the same connection, and Redis runs a connection's
        commands in order. So they are pipelined, not sent one after the other (a round
        trip each, and a chain of Deferreds each: 150 us of the gateway's CPU a call,
        measured). At most ``max_inflight`` operations are with Redis at once, the rest wait
        in call order. One whose caller has given up before it is sent is skipped, so an
        enqueue refused during an outage does not land when Redis comes back; one already
        sent may still be applied (a timeout cannot tell).
        """
        if self._closing is not None:
            return defer.fail(StoreUnavailable("the Redis store is closed"))
        if len(self._waiting) + self._inflight >= self.max_queue:
            return defer.fail(StoreUnavailable(
                f"{len(self._waiting) + self._inflight} operations are waiting for Redis at {self.address}"))
        now = self.reactor.seconds()
        if not self._waiting and self._inflight < self.max_inflight and not self._live(now):
            if self._down_since is None:
                self._down_since = now
            elif now - self._down_since >= self.timeout:
                # Down for longer than a caller waits: say so at once rather than pile up
                # waiters (and their payloads) for the whole outage.
                return defer.fail(StoreUnavailable(f"no connection to Redis at {self.address} "
                                                   f"for {now - self._down_since:.0f}s"))
        op = _Op(self, script, args, nkeys, device, now + self.timeout, wait)
        self._waiting.append(op)
        if len(self._waiting) == 1:
            self._dispatch()
        if self._timer is None:
            self._timer = self.reactor.callLater(self._tick, self._sweep)
        return op.result

    def _live(self, now):
        conns = self._pool.connections()
        if not conns and self._pool.gave_up and now - self._pool_since >= self.timeout:
            # txredisapi stops reconnecting for good when a connection is lost during its
            # AUTH or SELECT (Redis going down at that moment, maxclients, a wrong password):
            # start over, at most once per timeout.
            self.log.warn("Redis at {address}: the connection pool gave up; starting a new one",
                          address=self.address)
            old, self._pool, self._pool_since = self._pool, self._connect(), now
            self._down_since = None
            retiring = old.disconnect()
            self._retiring.append(retiring)
            retiring.addBoth(lambda r: self._retiring.remove(retiring) or r)
        return conns

    def _dispatch(self):
        waiting = self._waiting
        conns = None
        while waiting and self._inflight < self.max_inflight:
            op = waiting[0]
            if op.result.called:  # timed out while waiting: never sent
                waiting.popleft()
                continue
            if conns is None:
                conns = self._live(self.reactor.seconds())
                if not conns:
                    return
            pin = self._pins.get(op.device) if op.device is not None else None
            if pin is not None and pin[0].connected:
                conn = pin[0]
                pin[1] += 1
            else:
                self._next = (self._next + 1) % len(conns)
                conn = conns[self._next]
                if op.device is not None:
                    self._pins[op.device] = [conn, 1]
            waiting.popleft()
            self._send(op, conn)

    def _send(self, op, conn):
        op.conn = conn
        self._inflight += 1
        waiters = [op]
        if op.script is not None:
            sha = _sha(op.script)
            loaded = self._loaded.get(conn)
            if loaded is None:
                loaded = self._loaded[conn] = set()
                conn.whenDisconnected().addCallback(self._loaded.pop, None)
            if sha in loaded:
                command = _encode(b"EVALSHA", sha, b"%d" % op.nkeys, *op.args)
            else:
                # Loaded in the same write, ahead of its first use on this connection: one
                # round trip, and no NOSCRIPT retry that could let a later command overtake.
                loaded.add(sha)
                command = _encode(b"SCRIPT", b"LOAD", op.script) + _encode(b"EVALSHA", sha, b"%d" % op.nkeys, *op.args)
                waiters.insert(0, _ScriptLoaded(loaded, sha))
        else:
            command = _encode(*op.args)
        if op.wait:
            # Pipelined behind the write: WAIT counts the replicas that have everything this
            # connection wrote so far, the enqueue included.
            command += self._wait_command
            waiters.append(op)
        sent = self._sent.get(conn)
        if sent is None:
            sent = self._sent[conn] = collections.deque()
        sent.append(op)
        try:
            txredis.send_to(conn, command, waiters)
        except Exception as e:
            self._answered(op, e)

    def _replied(self, op, reply):
        if op.wait:
            (written,) = op.reply
            if isinstance(written, Exception):
                reply = written
            elif not isinstance(reply, Exception) and int(reply) < self.wait:
                reply = StoreUnavailable(
                    f"Redis at {self.address}: {int(reply)} of --redis-wait {self.wait} replicas "
                    f"acknowledged the write within {self.timeout / 2:g}s")
            elif not isinstance(reply, Exception):
                reply = written
        self._answered(op, reply)

    def _answered(self, op, outcome):
        conn = op.conn
        self._inflight -= 1
        sent = self._sent.get(conn)
        if sent:
            if sent[0] is op:
                sent.popleft()
            else:
                sent.remove(op)
            if not sent:
                del self._sent[conn]
        if op.device is not None:
            pin = self._pins.get(op.device)
            if pin is not None and pin[0] is conn:
                pin[1] -= 1
                if pin[1] <= 0:
                    del self._pins[op.device]
        result = op.result
        if not result.called:
            if isinstance(outcome, Exception):
                result.errback(self._unavailable(outcome, conn))
            else:
                result.callback(outcome)
        # else: the caller has had its answer (a timeout); this late one goes nowhere.
        if self._waiting:
            self._dispatch()

    def _sweep(self):
        """Every tick while operations are outstanding: answer those past their time."""
        self._timer = None
        now = self.reactor.seconds()
        waiting = self._waiting
        while waiting and (waiting[0].result.called or waiting[0].deadline <= now):
            op = waiting.popleft()
            if not op.result.called:
                op.result.errback(StoreUnavailable(self._late()))
        for conn, sent in list(self._sent.items()):
            op = sent[0]
            if op.deadline <= now and not op.result.called:
                op.result.errback(StoreUnavailable(self._late()))
                if conn.connected:
                    # Sent and not answered: the connection may be half-open (Redis's host
                    # gone without a reset), which nothing else would notice for many
                    # minutes. Drop it so that txredisapi connects again; everything sent on
                    # it fails with it.
                    self.log.warn("Redis at {address} did not answer in {timeout}s; reconnecting",
                                  address=self.address, timeout=self.timeout)
                    conn.transport.abortConnection()
        if (self._waiting or self._inflight) and self._closing is None:
            self._timer = self.reactor.callLater(self._tick, self._sweep)

    def _late(self):
        return f"Redis at {self.address} did not answer within {self.timeout:g}s"

    def _unavailable(self, error, conn):
        if isinstance(error, txredisapi.ConnectionError):  # TimeoutError too
            return StoreUnavailable(f"Redis at {self.address}: {error}")
        if isinstance(error, txredisapi.ResponseError):  # LOADING, OOM, MISCONF, BUSY, READONLY, NOSCRIPT...
            why = str(error)
            if why.startswith("NOSCRIPT"):
                # Someone ran SCRIPT FLUSH: load them again on this connection's next use.
                self._loaded.pop(conn, None)
            return StoreUnavailable(f"Redis at {self.address} refused: {why}")
        return error

    def _script(self, script, keys, args, device=None, wait=False):
        return self._call(script, (*keys, *args), len(keys), device, wait)

    def _command(self, *args, device=None):
        return self._call(None, tuple(a if isinstance(a, bytes) else str(a).encode() for a in args), 0, device)

    def _base(self, device_id: str) -> bytes:
        return b"%s:{%s}:" % (self._prefix, device_id.encode("utf-8"))

    def close(self):
        if self._closing is None:
            pools = [self._pool.disconnect(), *self._retiring]
            self._closing = defer.gatherResults(pools, consumeErrors=True)
            self._closing.addErrback(lambda f: self.log.failure("closing the Redis pool", f))
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            ops = list(self._waiting) + [op for sent in self._sent.values() for op in sent]
            self._waiting.clear()
            for op in ops:
                if not op.result.called:
                    op.result.errback(StoreUnavailable("the Redis store is closed"))
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
                         args, m.device_id, wait=self.wait > 0)
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

    def release_all(self, node, device_ids=()):
        """The node's presence keys are per device (no index by node): the caller names
        them, released in a few scripts of RELEASE_CHUNK keys."""
        keys = [self._base(d) + b"node" for d in device_ids]
        arg = [node.encode("utf-8")]
        calls = [self._script(_RELEASE_ALL, keys[i:i + RELEASE_CHUNK], arg)
                 for i in range(0, len(keys), RELEASE_CHUNK)]
        return defer.gatherResults(calls, consumeErrors=True).addCallback(sum)

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
