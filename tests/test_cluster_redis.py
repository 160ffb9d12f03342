"""
The cluster on a real redis-server: the node bus (PUB/SUB, heartbeats), enqueue naming the
device's live owner in the same script, presence that expires with its node's heartbeat.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pushd.store.interfaces import Enqueued, Owner
from pushd.store.redis import RedisStore
from pushd.store.redisbus import RedisNodeBus

from .bus_contract import BusContract, Listener, until
from .redis_server import RedisSentinel, RedisServer
from .test_store_sentinel import replicated
from .store_contract import DEV, msg


class RedisClusterTests(BusContract, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.store = self.makeStore()

    def makeStore(self):
        store = RedisStore(self.redis.url, per_topic=10, timeout=2.0)
        self.addCleanup(store.close)
        return store

    def makeBus(self):
        bus = RedisNodeBus(self.store)
        self.addCleanup(bus.close)
        return bus

    @defer.inlineCallbacks
    def test_enqueue_names_the_live_owner(self):
        bus = self.makeBus()
        self.assertEqual((yield self.store.enqueue(msg(b"1"))), Enqueued(), "nobody holds the device")
        yield self.store.claim(DEV, "node-1", 3)
        self.assertEqual((yield self.store.enqueue(msg(b"2"))), Enqueued(), "its node has no heartbeat")
        yield bus.beat("node-1", 60)
        self.assertEqual((yield self.store.enqueue(msg(b"3"))), Enqueued(owner=Owner("node-1", 3)))
        yield self.store.invalidate(msg().token, 5.0)
        self.assertEqual((yield self.store.enqueue(msg(b"4"))), Enqueued(invalidated=5.0))
        yield self.store.release(DEV, "node-1", 3)
        yield self.store.revalidate(msg().token)
        self.assertEqual((yield self.store.enqueue(msg(b"5"))), Enqueued(), "released")

    @defer.inlineCallbacks
    def test_presence_expires_with_the_node_s_heartbeat(self):
        bus = self.makeBus()
        yield bus.beat("node-1", 0.3)
        self.assertIsNone((yield self.store.claim(DEV, "node-1", 1)))
        self.assertEqual((yield self.store.where(DEV)), Owner("node-1", 1))
        where = [Owner("node-1", 1)]

        @defer.inlineCallbacks
        def look():
            where[0] = yield self.store.where(DEV)

        while where[0] is not None:
            yield look()
            yield until(lambda: True)
        self.assertEqual((yield self.store.enqueue(msg())), Enqueued(), "a dead node is no owner")
        yield bus.beat("node-2", 60)
        self.assertIsNone((yield self.store.claim(DEV, "node-2", 1)), "a dead node is not kicked")
        self.assertEqual((yield self.store.enqueue(msg())), Enqueued(owner=Owner("node-2", 1)))
        # No per-device key expires: the entry came back with its node (a late heartbeat).
        yield self.store.claim(DEV, "node-1", 2)
        self.assertIsNone((yield self.store.where(DEV)))
        yield bus.beat("node-1", 60)
        self.assertEqual((yield self.store.where(DEV)), Owner("node-1", 2))

    @defer.inlineCallbacks
    def test_the_subscription_comes_back_after_redis_restarts(self):
        bus, one = yield self.listening("node-1")
        yield self.redis.restart()
        yield until(lambda: one.connects == 2, within=30, what="subscribed again")
        sender = self.makeBus()
        self.assertEqual((yield sender.publish("node-1", b"a")), 1)
        yield until(lambda: one.messages == [b"a"], what="delivered")

    @defer.inlineCallbacks
    def test_asked_to_subscribe_again_it_does_not_wait_out_the_backoff(self):
        """Redis is back while the subscriber waits between attempts (txredisapi: 1, 2.7,
        7.4, 10 s): asked to, it subscribes now, not at its next attempt."""
        bus, one = yield self.listening("node-1")
        yield self.redis.stop()
        # The first attempt (after ~1 s) has failed; the next is ~2.7 s after it.
        yield task.deferLater(reactor, 1.5, lambda: None)
        yield self.redis.start()
        bus.reconnect()
        # (connected is called once SUBSCRIBE is answered.)
        yield until(lambda: one.connects == 2, within=1.0, what="subscribed again at once")


class SentinelBusTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_the_subscription_follows_a_failover(self):
        """After Sentinel promotes a replica, the node subscribes on the new master (a node
        that stays subscribed to the dead one would silently receive nothing)."""
        master = yield RedisServer(self).start()
        replica = yield RedisServer(self, replica_of=master).start()
        yield replicated(master, 1)
        sentinel = yield RedisSentinel(self, master, "pushd-test").start()
        yield sentinel.knows_replicas(1)
        store = RedisStore(sentinel.store_url(), per_topic=10, timeout=1.0)
        self.addCleanup(store.close)
        # Listening at once, as a gateway does at start: the master is not known yet.
        self.assertIsNone(store.master)
        bus, one = RedisNodeBus(store), Listener()
        self.addCleanup(bus.close)
        bus.listen("node-1", one.received, one.connected)
        yield until(lambda: one.connects == 1, what="subscribed")
        yield master.kill()
        yield until(lambda: store.master == ("127.0.0.1", replica.port), within=30, what="failed over")
        yield until(lambda: one.connects >= 2, within=30, what="subscribed on the new master")
        sender = RedisNodeBus(store)
        self.assertEqual((yield sender.publish("node-1", b"a")), 1)
        yield until(lambda: one.messages == [b"a"], what="delivered")
