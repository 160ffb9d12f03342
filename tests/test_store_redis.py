"""The store contract against a real redis-server, and what Redis adds: crashes, outages, order."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from pushd import wire
from pushd.store.interfaces import StoreUnavailable
from pushd.store.interfaces import Owner
from pushd.store.redis import RedisStore, parse_url
from pushd.store.redisbus import RedisNodeBus

from .redis_server import RedisServer
from .store_contract import (
    DEV,
    NOW,
    OTHER,
    A,
    B,
    DurableStoreContract,
    StoreContract,
    msg,
)

C = wire.topic_hash("com.example.c")


class _Hangup(protocol.Factory):
    """A server that accepts connections and closes them at once."""

    accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        p = protocol.Protocol()
        p.connectionMade = lambda: p.transport.loseConnection()
        return p


SHORT = 1.0  # the store timeout in the outage tests
SLACK = 0.5  # what the reactor may add to it on a loaded machine


class RedisStoreTests(StoreContract, DurableStoreContract, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        yield super().setUp()

    @defer.inlineCallbacks
    def alive(self, *nodes, ttl=600):
        bus = RedisNodeBus(self.store)
        for node in nodes:
            yield bus.beat(node, ttl)

    def makeStore(self, per_topic, url=None, **kw):
        store = RedisStore(url or self.redis.url, per_topic=per_topic, **kw)
        self.addCleanup(store.close)
        return defer.succeed(store)

    @defer.inlineCallbacks
    def reopen(self, store):
        yield store.close()
        return (yield self.makeStore(store.per_topic))

    @defer.inlineCallbacks
    def eventually(self, operation, within=15.0):
        """Retry ``operation`` until the store answers again (txredisapi reconnects with a backoff)."""
        deadline = reactor.seconds() + within
        while True:
            try:
                return (yield operation())
            except StoreUnavailable:
                if reactor.seconds() > deadline:
                    raise
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def assertUnavailableWithin(self, store, seconds):
        """Every kind of operation fails with StoreUnavailable, none later than ``seconds``."""
        started = reactor.seconds()
        calls = {
            "enqueue": store.enqueue(msg(b"while down")),
            "pending": store.pending(DEV, {msg().topic_hash}, 10, NOW),
            "ack": store.ack(DEV, b"\x00" * 16),
            "expire": store.expire(NOW),
            "counters": store.counters(),
            "invalidated": store.invalidated(b"\x01" * 32),
            "claim": store.claim(DEV, "node-1", 1),
        }
        for name, d in calls.items():
            try:
                yield d
            except StoreUnavailable:
                pass
            else:
                self.fail(f"{name} succeeded with Redis unreachable")
            self.assertLessEqual(reactor.seconds() - started, seconds, f"{name} took too long to fail")

    def info(self, store, section, field):
        d = store._command(b"INFO", section)
        return d.addCallback(lambda info: int(info.split(field + b":")[1].split(b"\r\n")[0]))

    @defer.inlineCallbacks
    def poolConnected(self, store, n, within=10.0):
        """Wait until Redis sees ``n`` clients (the pool connects in the background)."""
        deadline = reactor.seconds() + within
        while True:
            clients = yield self.info(store, b"clients", b"connected_clients")
            if clients >= n:
                return
            self.assertLess(reactor.seconds(), deadline, f"{clients} of {n} connections after {within}s")
            yield task.deferLater(reactor, 0.05, lambda: None)

    def keys(self, store, pattern=b"*"):
        return store._command(b"KEYS", pattern).addCallback(sorted)

    # --- what the contract does not say ---------------------------------------------------

    @defer.inlineCallbacks
    def test_acked_and_expired_leave_no_keys(self):
        """Every index entry goes with its message: a device with nothing pending has no keys."""
        ms = [msg(b"c1", collapse_id="c"), msg(b"c2", collapse_id="c"), msg(b"old", expiry=NOW - 5),
              msg(b"zero", expiry=0), msg(b"b", topic="com.example.b", collapse_id="c"),
              msg(b"other", device=OTHER, expiry=NOW - 1)]
        ms += [msg(b"%d" % i, topic="com.example.c", expiry=NOW - i % 2) for i in range(self.per_topic + 2)]
        yield self.put(*ms)  # c1 collapsed, 0 and 1 dropped by the cap
        self.assertEqual((yield self.store.expire(NOW)), 2 + 2, "old, other, 3 and 5")
        left = yield self.pending(topics=(A, B, C), now=0)
        self.assertEqual([m.payload for m in left], [b"c2", b"zero", b"b", b"2", b"4", b"6"])
        for m in left:
            self.assertTrue((yield self.store.ack(DEV, m.message_id)))
        self.assertEqual((yield self.store.counters()), {"pending": 0, "dropped": 2})
        self.assertEqual((yield self.keys(self.store)), [b"pushd:dropped", b"pushd:pending"])

    @defer.inlineCallbacks
    def test_expire_runs_in_batches(self):
        self.store.expire_batch = 3
        yield self.put(*[msg(b"%d" % i, expiry=NOW - i - 1, device=f"{i:032x}") for i in range(7)])
        yield self.put(msg(b"live"))
        self.assertEqual((yield self.store.expire(NOW)), 7)
        self.assertEqual((yield self.store.counters())["pending"], 1)

    @defer.inlineCallbacks
    def test_pending_looks_past_expired_ones(self):
        """The limit counts live messages, however many expired ones come first."""
        expired = [msg(b"x%d" % i, topic=("com.example.a" if i % 2 else "com.example.b"), expiry=NOW - 1)
                   for i in range(self.per_topic)]
        live = [msg(b"%d" % i, topic=("com.example.a" if i % 2 else "com.example.b")) for i in range(4)]
        yield self.put(*expired, *live)
        got = yield self.pending(limit=3, now=NOW - 0.5)
        self.assertEqual([m.payload for m in got], [b"0", b"1", b"2"])

    @defer.inlineCallbacks
    def test_odd_ids_and_devices(self):
        """Ids may hold the separators the key names use; device ids need not be ASCII."""
        device = "caf\u00e9:{x}"
        m1 = msg(b"1", device=device, message_id=b"1:{" + b"\x00" * 12 + b"}:m", expiry=NOW - 1)
        m2 = msg(b"2", device=device, message_id=b":" * 16, collapse_id="")
        yield self.put(m1, m2)
        self.assertEqual((yield self.pending(device=device, now=NOW - 2)), [m1, m2])
        self.assertEqual((yield self.store.expire(NOW)), 1)
        m3 = msg(b"3", device=device, collapse_id="")
        yield self.put(m3)
        self.assertEqual((yield self.pending(device=device)), [m3], "the empty collapse id is one too")

    @defer.inlineCallbacks
    def test_a_device_s_operations_keep_their_order(self):
        """Operations issued without waiting apply in order, although the pool has 4 connections."""
        yield self.poolConnected(self.store, 4)
        ms = [msg(b"%d" % i) for i in range(100)]
        ds = []
        for i, m in enumerate(ms):
            ds += [self.store.claim(DEV, f"node-{i}", i), self.store.enqueue(m), self.store.ack(DEV, m.message_id),
                   self.store.release(DEV, f"node-{i}", i)]
        results = yield defer.gatherResults(ds)
        self.assertEqual(results[0::4], [None] * len(ms), "each claim follows the release before it")
        self.assertEqual(results[2::4], [True] * len(ms), "each ack follows its enqueue")
        self.assertIsNone((yield self.store.where(DEV)))
        self.assertEqual((yield self.pending()), [])

    def test_rejects_what_redis_would_stringify(self):
        m = msg()
        m.payload = None
        self.failureResultOf(self.store.enqueue(m), TypeError)

    def test_urls(self):
        self.assertEqual(parse_url("redis://127.0.0.1:6380/2"), ("127.0.0.1", 6380, 2, None, None))
        self.assertEqual(parse_url("redis://:p%40ss@cache"), ("cache", 6379, 0, None, "p@ss"))
        self.assertEqual(parse_url("redis://me:pw@[::1]:7000/"), ("::1", 7000, 0, "me", "pw"))
        for bad, why in [("http://127.0.0.1:6379/0", "scheme"), ("rediss://h/0", "scheme"),
                         ("redis://:6379/0", "no host"), ("redis://h:port/0", "port"), ("redis://h:0/0", "port"),
                         ("redis://h:99999/0", "port"), ("redis://h/db0", "database number"),
                         ("redis://h/0?timeout=1", "query"), ("127.0.0.1:6379", "scheme")]:
            with self.assertRaisesRegex(ValueError, why, msg=bad):
                RedisStore(bad)

    # --- crashes and outages ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_survives_redis_crash(self):
        """Acknowledged writes are in the append-only file when Redis is SIGKILLed."""
        m1, m2, m3 = msg(b"1"), msg(b"2", collapse_id="c"), msg(b"3", topic="com.example.b")
        yield self.put(m1, m2, m3, msg(b"x", device=OTHER, expiry=NOW - 1))
        yield self.store.ack(DEV, m1.message_id)
        yield self.store.invalidate(b"\x05" * 32, NOW)
        yield self.alive("node-1")
        yield self.store.claim(DEV, "node-1", 5)
        reconnected = []
        self.store.on_master(lambda: reconnected.append(True))
        yield self.redis.kill()
        yield self.redis.restart()
        got = yield self.eventually(self.pending)
        self.assertEqual(reconnected, [True], "listeners hear of the reconnection once, not per pool connection")
        self.assertEqual(got, [m2, m3])
        self.assertEqual((yield self.store.counters()), {"pending": 3, "dropped": 0})
        self.assertEqual((yield self.store.invalidated(b"\x05" * 32)), NOW)
        self.assertEqual((yield self.store.where(DEV)), Owner("node-1", 5))
        self.assertEqual((yield self.store.expire(NOW)), 1, "the expiry index came back too")
        yield self.put(msg(b"4"), msg(b"2'", collapse_id="c"))
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"3", b"4", b"2'"])

    @defer.inlineCallbacks
    def test_redis_down_fails_fast_then_recovers(self):
        store = yield self.makeStore(self.per_topic, timeout=SHORT)
        kept = msg(b"kept")
        yield store.enqueue(kept)
        yield self.redis.kill()
        lost = msg(b"refused")
        refused = store.enqueue(lost)
        yield self.assertUnavailableWithin(store, SHORT + SLACK)
        yield self.assertFailure(refused, StoreUnavailable)
        yield self.assertFailure(store.counters(), StoreUnavailable)  # this one finds no connection
        yield task.deferLater(reactor, SHORT, lambda: None)
        self.failureResultOf(store.counters(), StoreUnavailable)  # down for longer than a timeout: at once
        yield self.redis.restart()
        yield self.eventually(lambda: store.enqueue(msg(b"after")))
        got = yield store.pending(DEV, {kept.topic_hash}, 10, NOW)
        self.assertEqual([m.payload for m in got], [b"kept", b"after"], "a refused enqueue does not land later")

    @defer.inlineCallbacks
    def test_redis_frozen_fails_fast_then_recovers(self):
        """
        A server that keeps the connection open and never answers is the same as none. (What
        was sent before the time ran out may still be applied: a timeout cannot tell.)
        """
        store = yield self.makeStore(self.per_topic, timeout=SHORT)
        yield store.enqueue(msg(b"kept"))
        yield self.poolConnected(store, 4)
        connections = yield self.info(store, b"stats", b"total_connections_received")
        self.redis.pause()
        try:
            yield self.assertUnavailableWithin(store, SHORT + SLACK)
        finally:
            self.redis.resume()
        yield self.eventually(lambda: store.enqueue(msg(b"after")))
        got = yield store.pending(DEV, {msg().topic_hash}, 10, NOW)
        self.assertEqual((got[0].payload, got[-1].payload), (b"kept", b"after"))
        # A connection that did not answer is replaced: it may be half-open. (txredisapi
        # reconnects after a backoff, and the connections not used meanwhile serve until then.)
        deadline = reactor.seconds() + 10
        while (yield self.info(store, b"stats", b"total_connections_received")) == connections:
            self.assertLess(reactor.seconds(), deadline, "the connections that timed out were kept")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_redis_down_at_start(self):
        yield self.redis.kill()
        store = yield self.makeStore(self.per_topic, timeout=SHORT)
        yield self.assertUnavailableWithin(store, SHORT + SLACK)
        yield self.redis.restart()
        yield self.eventually(lambda: store.enqueue(msg(b"late")))
        self.assertEqual((yield store.counters())["pending"], 1)

    @defer.inlineCallbacks
    def test_recovers_when_connections_die_during_select(self):
        """
        txredisapi stops reconnecting for good when a connection is lost while it sends
        SELECT (Redis going down at that moment, or refusing clients): the store starts over.
        """
        yield self.redis.kill()
        hangup = _Hangup()
        port = reactor.listenTCP(self.redis.port, hangup, interface="127.0.0.1")
        try:
            store = yield self.makeStore(self.per_topic, url=self.redis.url[:-1] + "1", timeout=SHORT)
            yield self.assertFailure(store.counters(), StoreUnavailable)
            self.assertGreater(hangup.accepted, 0)
        finally:
            yield port.stopListening()
        yield self.redis.restart()
        c = yield self.eventually(store.counters)
        self.assertEqual(c, {"pending": 0, "dropped": 0})

    @defer.inlineCallbacks
    def test_close_answers_waiting_calls(self):
        yield self.redis.kill()
        d = self.store.counters()
        yield self.store.close()
        self.failureResultOf(d, StoreUnavailable)
        self.failureResultOf(self.store.enqueue(msg()), StoreUnavailable)

    @defer.inlineCallbacks
    def test_bounded_queue(self):
        yield self.redis.kill()
        self.store.max_queue = 2
        ds = [self.store.enqueue(msg()) for _ in range(3)]
        self.failureResultOf(ds[2], StoreUnavailable)
        self.assertNoResult(ds[0])
        yield self.store.close()
        for d in ds[:2]:
            self.failureResultOf(d, StoreUnavailable)
