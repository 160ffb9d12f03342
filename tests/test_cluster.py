"""
The cluster's node logic (pushd.gateway.cluster) on a task.Clock: the outbox's coalescing and
bounds, kicks by epoch, wakes across nodes, waking every session on a (re)subscribe, a lapsed
heartbeat or a probe that does not come back. Nodes share an in-process bus (LocalBus).
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from pushd import wire
from pushd.gateway import cluster
from pushd.gateway.cluster import Node, Outbox
from pushd.gateway.router import Router
from pushd.gateway.tokens import TokenMinter
from pushd.store.interfaces import Enqueued, Owner, StoredMessage
from pushd.store.memory import LocalBus, LocalHub, MemoryStore

from .bus_contract import BusContract

DEV = "00112233445566778899aabbccddeeff"


class FakeBus:
    """Records what is published; each publish answers when the test says."""

    shared = False

    def __init__(self):
        self.sent = []  # (node, decoded message, Deferred)
        self.reconnects = 0
        self.alive = True

    def publish(self, node, data):
        d = defer.Deferred()
        self.sent.append((node, cluster.decode(data), d))
        return d

    def listen(self, node, received, connected):
        self.received, self.connected = received, connected

    def beat(self, node, ttl):
        return defer.succeed(self.alive)

    def reconnect(self):
        self.reconnects += 1

    def close(self):
        return defer.succeed(None)


class FakeSession:
    def __init__(self):
        self.wakes = 0
        self.closed = False
        self.epoch = None

    def wake(self):
        self.wakes += 1

    def replaced(self):
        self.closed = True

    def wants(self, topic_hash):
        return True


class OutboxTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.bus = FakeBus()
        self.outbox = Outbox(self.bus, self.clock, max_batch=3, max_pending=5, retry=1.0)

    def test_wakes_to_a_node_go_in_one_message_per_turn(self):
        for device in ["d1", "d2", "d1", "d2"]:
            self.outbox.wake("B", device)
        self.outbox.wake("C", "d3")
        self.assertEqual(self.bus.sent, [], "nothing before the reactor turn ends")
        self.clock.advance(0)
        self.assertEqual(sorted((node, m[0]) for node, m, _ in self.bus.sent), [("B", ["d1", "d2"]), ("C", ["d3"])])

    def test_one_message_in_flight_per_node_and_at_most_one_per_device(self):
        self.outbox.wake("B", "d1")
        self.clock.advance(0)
        self.outbox.wake("B", "d1")
        self.outbox.wake("B", "d2")
        self.outbox.wake("B", "d1")
        self.clock.advance(0)
        self.assertEqual(len(self.bus.sent), 1, "the second waits for the first to be answered")
        self.bus.sent[0][2].callback(1)
        self.clock.advance(0)
        self.assertEqual([m[0] for _, m, _ in self.bus.sent], [["d1"], ["d1", "d2"]])
        self.bus.sent[1][2].callback(1)
        self.clock.advance(0)
        self.assertEqual(len(self.bus.sent), 2)
        self.assertEqual(self.outbox.pending, 0)
        self.assertEqual(self.outbox._mail, {}, "nothing kept for a node with nothing waiting")

    def test_batches_are_bounded(self):
        for i in range(5):
            self.outbox.wake("B", f"d{i}")
        self.clock.advance(0)
        self.assertEqual(self.bus.sent[0][1][0], ["d0", "d1", "d2"])
        self.bus.sent[0][2].callback(1)
        self.clock.advance(0)
        self.assertEqual(self.bus.sent[1][1][0], ["d3", "d4"])

    def test_beyond_the_bound_a_node_s_wakes_become_wake_all(self):
        for i in range(5):
            self.outbox.wake("B", f"d{i}")
        self.outbox.wake("B", "d5")
        self.outbox.wake("B", "d6")
        self.assertEqual(self.outbox.pending, 0, "collapsed: nothing held per device")
        self.assertEqual(self.outbox.collapsed, 1)
        self.clock.advance(0)
        wakes, kicks, everyone, _ = self.bus.sent[0][1]
        self.assertEqual((wakes, everyone), ([], True))

    def test_a_failed_publish_is_retried_later(self):
        self.outbox.wake("B", "d1")
        self.outbox.kick("B", "d2", 7)
        self.clock.advance(0)
        self.bus.sent[0][2].errback(RuntimeError("Redis down"))
        self.clock.advance(0)
        self.assertEqual(len(self.bus.sent), 1, "not at once")
        self.clock.advance(1.0)
        self.clock.advance(0)
        self.assertEqual(len(self.bus.sent), 2)
        self.assertEqual(self.bus.sent[1][1][:2], (["d1"], [("d2", 7)]))

    def test_kicks_beyond_the_bound_are_dropped_and_counted(self):
        for i in range(5):
            self.outbox.kick("B", f"d{i}", i)
        self.outbox.kick("B", "d9", 9)
        self.assertEqual(self.outbox.kicks_dropped, 1)
        self.assertEqual(self.outbox.pending, 5)


class NodeTests(unittest.TestCase):
    """Two nodes, one store (memory: every node named is alive) and one in-process bus."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore()
        self.hub = LocalHub(self.clock)
        self.a, self.node_a = self.node("A")
        self.b, self.node_b = self.node("B")
        self.clock.advance(0)  # subscribed

    def node(self, name, bus=None):
        router = Router(self.store, TokenMinter(b"k" * 32), self.clock)
        node = Node(name, router, bus or LocalBus(self.hub), self.clock)
        node.startService()
        self.addCleanup(node.stopService)
        return router, node

    def test_a_device_that_moves_closes_its_session_on_the_old_node(self):
        old, new = FakeSession(), FakeSession()
        self.a.attach(DEV, old)
        self.clock.advance(0)
        self.b.attach(DEV, new)
        self.clock.advance(0)  # B's claim named A: the kick goes out
        self.clock.advance(0)  # and arrives
        self.assertTrue(old.closed)
        self.assertFalse(new.closed)

    def test_a_stale_kick_does_not_close_a_newer_session(self):
        first, again = FakeSession(), FakeSession()
        self.a.attach(DEV, first)
        self.a.attach(DEV, again)  # a quick reconnect back to A
        self.assertTrue(first.closed, "replaced on the same node")
        self.node_b.kick("A", DEV, first.epoch)  # B learned of the first one only
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertFalse(again.closed)
        self.node_b.kick("A", DEV, again.epoch)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertTrue(again.closed)

    def test_epochs_differ_across_a_restart_under_the_same_id(self):
        s1, s2 = FakeSession(), FakeSession()
        self.a.attach(DEV, s1)
        self.clock.advance(1)
        Router(self.store, TokenMinter(b"k" * 32), self.clock).attach(DEV, s2)
        self.assertNotEqual(s1.epoch, s2.epoch)

    def test_a_push_stored_for_a_device_on_another_node_wakes_it_there(self):
        on_b = FakeSession()
        self.b.attach(DEV, on_b)
        woken = on_b.wakes
        # A shared store names B as the owner (MemoryStore is one node's: it names none).
        self.a.store = _Owned(self.store, Owner("B", on_b.epoch))
        token = self.a.tokens.scoped_token(DEV, wire.topic_hash("com.example.a"))
        self.successResultOf(self.a.accept(token, "com.example.a", b"{}", b"\x01" * 16, expiry=1_900_000_000))
        self.clock.advance(0)  # A publishes
        self.clock.advance(0)  # B receives
        self.assertEqual(on_b.wakes, woken + 1)

    def test_an_expiration_0_push_for_a_device_on_another_node_is_stored_and_wakes_it(self):
        self.node_a.shared = True  # as on Redis: other processes' nodes
        th = wire.topic_hash("com.example.a")
        token = self.a.tokens.scoped_token(DEV, th)
        self.successResultOf(self.a.accept(token, "com.example.a", b"nobody", b"\x01" * 16, expiry=0))
        self.assertEqual(self.a.dropped_offline, 1, "no node holds the device: dropped")
        on_b = FakeSession()
        self.b.attach(DEV, on_b)
        woken = on_b.wakes
        self.a.store = _Owned(self.store, Owner("B", on_b.epoch))
        self.successResultOf(self.a.accept(token, "com.example.a", b"now", b"\x02" * 16, expiry=0))
        self.assertEqual(self.a.dropped_offline, 1)
        got = self.successResultOf(self.store.pending(DEV, {th}, 10, self.clock.seconds()))
        self.assertEqual([m.payload for m in got], [b"now"])
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(on_b.wakes, woken + 1)

    def test_resubscribing_wakes_every_session_paced(self):
        self.node_a.sweep_batch = 2
        sessions = [FakeSession() for _ in range(5)]
        for i, s in enumerate(sessions):
            self.a.attach(f"{i:032x}", s)
        self.node_a.bus.reconnect()
        self.clock.advance(0)
        self.assertEqual([s.wakes for s in sessions], [1, 1, 0, 0, 0], "a batch now")
        self.clock.advance(self.node_a.sweep_pause)
        self.clock.advance(self.node_a.sweep_pause)
        self.assertEqual([s.wakes for s in sessions], [1] * 5)

    def test_a_lapsed_heartbeat_wakes_every_session(self):
        s = FakeSession()
        self.a.attach(DEV, s)
        self.clock.advance(self.node_a.heartbeat)
        self.assertEqual(s.wakes, 0)
        self.hub.beats["A"] = 0  # expired meanwhile (Redis slow, or restarted)
        self.clock.advance(self.node_a.heartbeat)
        self.assertEqual(s.wakes, 1)

    def test_a_probe_that_does_not_come_back_resubscribes(self):
        bus = FakeBus()
        router, node = self.node("C", bus)
        bus.connected()
        bus.sent[-1][2].callback(1)  # the first beat's probe: published, never delivered
        self.assertEqual(bus.reconnects, 0)
        self.clock.advance(node.heartbeat)
        self.assertEqual(bus.reconnects, 1)

    def test_a_probe_that_comes_back_does_not(self):
        bus = FakeBus()
        router, node = self.node("C", bus)
        bus.connected()
        for _ in range(3):
            _, message, d = bus.sent[-1]
            d.callback(1)
            bus.received(cluster.encode(probe=message[3]))
            self.clock.advance(node.heartbeat)
        self.assertEqual(bus.reconnects, 0)


class NodeSettingsTests(unittest.TestCase):
    def test_node_ids_and_timings_are_checked_and_named(self):
        router, bus, clock = Router(MemoryStore(), TokenMinter(b"k" * 32), task.Clock()), FakeBus(), task.Clock()
        self.assertRegex(cluster.default_node_id(clock), cluster.NODE_ID)
        for bad in ["", "has space", "a\nb", "x" * 101]:
            with self.assertRaisesRegex(ValueError, "--node-id"):
                Node(bad, router, bus, clock)
        with self.assertRaisesRegex(ValueError, "--node-heartbeat .* --node-ttl"):
            Node("n", router, bus, clock, heartbeat=9, ttl=9)


class _Owned:
    """The memory store, as a store shared by nodes answers: it names the device's owner."""

    def __init__(self, store, owner):
        self.store, self.owner = store, owner

    def enqueue(self, m: StoredMessage):
        return self.store.enqueue(m).addCallback(lambda r: Enqueued(r.invalidated, self.owner))

    def __getattr__(self, name):
        return getattr(self.store, name)


class LocalBusTests(BusContract, unittest.TestCase):
    def setUp(self):
        self.hub = LocalHub()

    def makeBus(self):
        bus = LocalBus(self.hub)
        self.addCleanup(bus.close)
        return bus
