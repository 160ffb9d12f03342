"""
The Redis store behind Sentinel against real processes: a master, replicas and redis-sentinel
on loopback. The master is SIGKILLed; Sentinel promotes a replica; the store answers again
against the new master, tells its listeners, and nothing acknowledged under WAIT 1 is lost.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pushd.store.interfaces import Enqueued, StoreUnavailable
from pushd.store.redis import RedisStore

from .procs import free_port
from .redis_server import RedisSentinel, RedisServer, command
from .store_contract import DEV, NOW, msg

TIMEOUT = 1.0  # the store's timeout: WAIT waits at most half of it


@defer.inlineCallbacks
def replicated(master, n=1, within=10.0):
    """Wait until the master has ``n`` replicas online (Sentinel finds them in its INFO)."""
    deadline = reactor.seconds() + within
    while True:
        info = yield command(master.port, "INFO", "replication")
        if f"connected_slaves:{n}" in info and info.count("state=online") == n:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"the replica did not sync in {within:g}s:\n{info}")
        yield task.deferLater(reactor, 0.05, lambda: None)


class WaitTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_too_few_replicas_is_unavailable(self):
        """--redis-wait 1 without a replica: WAIT answers 0 and the push is refused, not answered 200."""
        redis = yield RedisServer(self).start()
        store = RedisStore(redis.url, per_topic=10, timeout=TIMEOUT, wait=1)
        self.addCleanup(store.close)
        started = reactor.seconds()
        e = yield self.assertFailure(store.enqueue(msg(b"unreplicated")), StoreUnavailable)
        self.assertIn("0 of --redis-wait 1 replicas", str(e))
        self.assertLess(reactor.seconds() - started, TIMEOUT, "WAIT's own limit is half the timeout")
        # Without --redis-wait the same store answers at once.
        plain = RedisStore(redis.url, per_topic=10, timeout=TIMEOUT)
        self.addCleanup(plain.close)
        self.assertEqual((yield plain.enqueue(msg(b"unreplicated"))), Enqueued())

    @defer.inlineCallbacks
    def test_replicated_push_is_answered(self):
        master = yield RedisServer(self).start()
        replica = yield RedisServer(self, replica_of=master).start()
        yield replicated(master)
        store = RedisStore(master.url, per_topic=10, timeout=TIMEOUT, wait=1)
        self.addCleanup(store.close)
        m = msg(b"on two servers")
        self.assertEqual((yield store.enqueue(m)), Enqueued())
        keys = yield command(replica.port, "KEYS", "pushd:{%s}:m:*" % DEV)
        self.assertEqual(len(keys), 1, "WAIT 1 answered: the replica has the message")


class SentinelFailoverTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_failover_loses_nothing_acknowledged(self):
        # Three servers, as in production: after the failover one replica is left for WAIT 1.
        master = yield RedisServer(self).start()
        replicas = [RedisServer(self, replica_of=master) for _ in range(2)]
        yield defer.gatherResults([r.start() for r in replicas])
        yield replicated(master, 2)
        sentinel = yield RedisSentinel(self, master, "pushd-test").start()
        yield sentinel.knows_replicas(2)
        # A sentinel address with nobody behind it is listed first: the live one answers.
        store = RedisStore(sentinel.store_url(extra=[f"127.0.0.1:{free_port()}"]), per_topic=1000,
                           timeout=TIMEOUT, wait=1)
        self.addCleanup(store.close)
        masters = []
        store.on_master(lambda: masters.append(reactor.seconds()))
        acked = []
        for i in range(20):
            m = msg(b"%d" % i)
            yield store.enqueue(m)
            acked.append(m)
        self.assertEqual(len(masters), 1, "told once at start")

        yield master.kill()
        killed = reactor.seconds()
        deadline = killed + 20
        ports = {r.port for r in replicas}
        while (yield sentinel.master_port()) not in ports:
            self.assertLess(reactor.seconds(), deadline, "Sentinel did not promote a replica")
            yield task.deferLater(reactor, 0.05, lambda: None)
        # Until the other replica follows the new master, WAIT 1 finds none: pushes fail
        # (503); none is answered 200 unreplicated.
        i = 0
        while True:
            m = msg(b"after %d" % i)
            i += 1
            try:
                yield store.enqueue(m)
            except StoreUnavailable:
                self.assertLess(reactor.seconds(), deadline, "the store did not answer after the failover:\n" + sentinel.process.log()[-3000:])
                yield task.deferLater(reactor, 0.05, lambda: None)
                continue
            acked.append(m)
            break
        self.assertIn((yield sentinel.master_port()), ports, "Sentinel promoted a replica")
        self.assertGreaterEqual(len(masters), 2, "the (re)connection to the new master was announced")
        self.assertEqual(store.master, ("127.0.0.1", (yield sentinel.master_port())))
        got = yield store.pending(DEV, {acked[0].topic_hash}, 1000, NOW)
        # Every push answered is there, in order. Pushes refused because WAIT found no replica
        # in time may be there too (applied on the master, not yet replicated): a provider's
        # retry with the same apns-id replaces such a copy rather than adding one.
        stored = [m.payload for m in got]
        self.assertEqual([p for p in stored if p in {m.payload for m in acked}], [m.payload for m in acked])
        # Sentinel takes down-after (1.5 s) + its failover; the store then at most its 2 s backoff.
        self.assertLess(reactor.seconds() - killed, 10, sentinel.process.log()[-4000:])


class UrlTests(unittest.TestCase):
    def test_sentinel_urls(self):
        from pushd.store.redis import parse_sentinel_url

        self.assertEqual(parse_sentinel_url("redis-sentinel://10.0.0.1:26379,10.0.0.2:26380/pushd/2"),
                         ([("10.0.0.1", 26379), ("10.0.0.2", 26380)], "pushd", 2, None, None))
        self.assertEqual(parse_sentinel_url("redis-sentinel://me:p%40ss@[::1]:26379/m"),
                         ([("::1", 26379)], "m", 0, "me", "p@ss"))
        for bad, why in [("redis-sentinel://h/m/0", "HOST:PORT"), ("redis-sentinel://h:1,h2/m/0", "'h2'"),
                         ("redis-sentinel://h:0/m", "port"), ("redis-sentinel://h:1", "names no master"),
                         ("redis-sentinel://h:1/m/x", "database number"), ("redis-sentinel://h:1/m/0/1", "database"),
                         ("redis-sentinel://h:1/m?x=1", "query")]:
            with self.assertRaisesRegex(ValueError, why, msg=bad):
                parse_sentinel_url(bad)

    def test_bad_store_is_one_line_naming_the_option(self):
        from twisted.python import usage

        from pushd.gateway.tap import Options

        for bad in ("redis-sentinel://h:1", "redis://h:port/0", "postgres://x", "sqlite-memory"):
            with self.assertRaises(usage.UsageError, msg=bad) as cm:
                Options().parseOptions(["--store", bad])
            text = str(cm.exception)
            self.assertTrue(text.startswith("--store: "), text)
            self.assertIn("redis-sentinel://", text, "the allowed forms are listed")
            self.assertNotIn("\n", text)
        Options().parseOptions(["--store", "redis-sentinel://127.0.0.1:26379/pushd/0", "--redis-wait", "1"])
