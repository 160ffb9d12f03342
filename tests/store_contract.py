"""
The contract every store provider passes. A provider's test case mixes in StoreContract
(and DurableStoreContract if it survives a restart) and defines:

    makeStore(per_topic) -> Deferred[store]     (cleanups registered by the test case)
    reopen(store) -> Deferred[store]            (durable providers: close, open again)
"""

from __future__ import annotations

import uuid

from twisted.internet import defer
from zope.interface.verify import verifyObject

from pushd import wire
from pushd.store.interfaces import (
    Enqueued,
    IMessageStore,
    IPresence,
    ITokenRegistry,
    Owner,
    StoredMessage,
    topic_scoped_id,
)

DEV = "00112233445566778899aabbccddeeff"
OTHER = "ffeeddccbbaa99887766554433221100"
A, B = wire.topic_hash("com.example.a"), wire.topic_hash("com.example.b")
NOW = 1_800_000_000


def msg(payload=b"{}", device=DEV, topic="com.example.a", **kw):
    fields = dict(
        message_id=uuid.uuid4().bytes,
        device_id=device,
        token=b"\x01" * 32,
        topic=topic,
        topic_hash=wire.topic_hash(topic),
        payload=payload,
        expiry=NOW + 3600,
        priority=10,
        collapse_id=None,
        received=NOW - 1.5,
    )
    fields.update(kw)
    return StoredMessage(**fields)


class StoreContract:
    per_topic = 5

    @defer.inlineCallbacks
    def setUp(self):
        self.store = yield self.makeStore(self.per_topic)

    @defer.inlineCallbacks
    def put(self, *messages):
        for m in messages:
            yield self.store.enqueue(m)

    def pending(self, device=DEV, topics=(A, B), limit=100, now=NOW):
        return self.store.pending(device, set(topics), limit, now)

    def test_interfaces(self):
        verifyObject(IMessageStore, self.store)
        verifyObject(ITokenRegistry, self.store)
        verifyObject(IPresence, self.store)

    @defer.inlineCallbacks
    def test_round_trip_every_field(self):
        m = msg(payload=bytes(range(256)) * 4, token=b"\x00\xff" * 16, priority=5,
                collapse_id="score-\u00e9", expiry=NOW + 10, received=NOW - 0.25)
        yield self.put(m)
        got = yield self.pending()
        self.assertEqual(got, [m])

    @defer.inlineCallbacks
    def test_acceptance_order_across_topics(self):
        ms = [msg(b"%d" % i, topic=("com.example.a" if i % 2 else "com.example.b")) for i in range(6)]
        yield self.put(*ms)
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [m.payload for m in ms])

    @defer.inlineCallbacks
    def test_topic_filter_and_limit(self):
        ms = [msg(b"%d" % i, topic=("com.example.a" if i % 2 else "com.example.b")) for i in range(6)]
        yield self.put(*ms)
        got = yield self.pending(topics=(A,))
        self.assertEqual([m.payload for m in got], [b"1", b"3", b"5"])
        got = yield self.pending(limit=2)
        self.assertEqual([m.payload for m in got], [b"0", b"1"])
        got = yield self.pending(topics=())
        self.assertEqual(got, [])

    @defer.inlineCallbacks
    def test_devices_are_separate(self):
        yield self.put(msg(b"mine"), msg(b"theirs", device=OTHER))
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"mine"])

    @defer.inlineCallbacks
    def test_ack_deletes_once(self):
        m1, m2 = msg(b"1"), msg(b"2")
        yield self.put(m1, m2)
        self.assertTrue((yield self.store.ack(DEV, m1.message_id)))
        self.assertFalse((yield self.store.ack(DEV, m1.message_id)))
        self.assertFalse((yield self.store.ack(OTHER, m2.message_id)), "another device's ack")
        got = yield self.pending()
        self.assertEqual(got, [m2])

    @defer.inlineCallbacks
    def test_ack_many_deletes_in_one_call(self):
        ms = [msg(b"%d" % i) for i in range(5)]
        for m in ms:
            yield self.store.enqueue(m)
        other = msg(b"x", device="ff" * 16)
        yield self.store.enqueue(other)
        gone = [m.message_id for m in ms[:3]] + [b"\x09" * 16, other.message_id]
        n = yield self.store.ack_many(DEV, gone)
        self.assertEqual(n, 3, "only this device's messages that were there")
        left = yield self.store.pending(DEV, {ms[0].topic_hash}, 10, NOW)
        self.assertEqual([m.message_id for m in left], [m.message_id for m in ms[3:]])
        self.assertEqual(len((yield self.store.pending(other.device_id, {other.topic_hash}, 10, NOW))), 1)
        self.assertEqual((yield self.store.counters())["pending"], 3)
        self.assertEqual((yield self.store.ack_many(DEV, [])), 0)

    @defer.inlineCallbacks
    def test_same_id_again_replaces(self):
        m = msg(b"first")
        yield self.put(m)
        m2 = msg(b"retry", message_id=m.message_id)
        yield self.put(m2)
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"retry"])

    @defer.inlineCallbacks
    def test_same_id_from_another_topic_replaces_nothing(self):
        """Another team reusing an apns-id for the same device neither deletes nor replaces the first."""
        theirs = msg(b"theirs", topic="com.example.a")
        yield self.put(theirs)
        mine = msg(b"mine", topic="com.example.b", message_id=theirs.message_id)
        yield self.put(mine)
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"theirs", b"mine"])
        self.assertEqual(got[0], theirs, "the first keeps its id and fields")
        scoped = topic_scoped_id(theirs.message_id, B)
        self.assertEqual(got[1].message_id, scoped, "the second has its own id on the wire")
        self.assertEqual(uuid.UUID(bytes=scoped).version, 8, "a UUID, never a random (v4) apns-id")
        # Its provider's retry still replaces its own copy, and only that.
        yield self.put(msg(b"mine again", topic="com.example.b", message_id=theirs.message_id))
        got = yield self.pending()
        self.assertEqual([(m.payload, m.message_id) for m in got],
                         [(b"theirs", theirs.message_id), (b"mine again", scoped)])
        # Each is acked on its own id: acking one leaves the other.
        self.assertTrue((yield self.store.ack(DEV, theirs.message_id)))
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"mine again"])
        self.assertEqual((yield self.store.counters())["pending"], 1)

    @defer.inlineCallbacks
    def test_taking_the_scoped_id_too_replaces_nothing(self):
        """A team that also holds the topic-scoped id (precomputed) still deletes nothing."""
        mid = uuid.uuid4().bytes
        squat = [msg(b"squat1", message_id=mid), msg(b"squat2", message_id=topic_scoped_id(mid, B))]
        yield self.put(*squat)
        yield self.put(msg(b"mine", topic="com.example.b", message_id=mid))
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"squat1", b"squat2", b"mine"])
        self.assertEqual(len({m.message_id for m in got}), 3, "three ids on the wire")
        self.assertEqual((yield self.store.ack_many(DEV, [m.message_id for m in got])), 3)

    @defer.inlineCallbacks
    def test_collapse_id_replaces_in_same_topic_only(self):
        yield self.put(msg(b"a1", collapse_id="c"), msg(b"b1", topic="com.example.b", collapse_id="c"),
                       msg(b"a-other", collapse_id="d"), msg(b"a2", collapse_id="c"))
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"b1", b"a-other", b"a2"])

    @defer.inlineCallbacks
    def test_cap_drops_oldest_and_counts(self):
        ms = [msg(b"%d" % i) for i in range(self.per_topic + 3)]
        yield self.put(*ms, msg(b"b", topic="com.example.b"))
        got = yield self.pending(topics=(A,))
        self.assertEqual([m.payload for m in got], [m.payload for m in ms[3:]])
        c = yield self.store.counters()
        self.assertEqual(c, {"pending": self.per_topic + 1, "dropped": 3})

    @defer.inlineCallbacks
    def test_expired_not_pending_then_purged(self):
        yield self.put(msg(b"old", expiry=NOW - 1), msg(b"now-or-never", expiry=0), msg(b"later", expiry=NOW + 1))
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"now-or-never", b"later"])
        n = yield self.store.expire(NOW)
        self.assertEqual(n, 1)
        c = yield self.store.counters()
        self.assertEqual(c["pending"], 2)
        n = yield self.store.expire(NOW + 2)
        self.assertEqual(n, 1, "expiry 0 is never purged by time, only by ack")

    @defer.inlineCallbacks
    def test_token_invalidation(self):
        t = b"\x02" * 32
        self.assertIsNone((yield self.store.invalidated(t)))
        yield self.store.invalidate(t, NOW)
        self.assertEqual((yield self.store.invalidated(t)), NOW)
        self.assertIsNone((yield self.store.invalidated(b"\x03" * 32)))
        yield self.store.revalidate(t)
        self.assertIsNone((yield self.store.invalidated(t)))

    @defer.inlineCallbacks
    def test_enqueue_refuses_an_invalidated_token(self):
        """One call answers both questions the provider API asks: valid? stored?"""
        m = msg(b"a")
        self.assertEqual((yield self.store.enqueue(m)), Enqueued())
        yield self.store.invalidate(m.token, NOW)
        self.assertEqual((yield self.store.enqueue(msg(b"b"))), Enqueued(invalidated=NOW))
        pending = yield self.store.pending(m.device_id, {m.topic_hash}, 10, NOW)
        self.assertEqual([p.message_id for p in pending], [m.message_id], "nothing stored for the invalid token")
        yield self.store.revalidate(m.token)
        self.assertEqual((yield self.store.enqueue(msg(b"c"))), Enqueued())
        pending = yield self.store.pending(m.device_id, {m.topic_hash}, 10, NOW)
        self.assertEqual(len(pending), 2)

    def alive(self, *nodes):
        """Make ``nodes``' heartbeats alive (a store that checks them overrides this)."""
        return defer.succeed(None)

    @defer.inlineCallbacks
    def test_presence(self):
        yield self.alive("node-1", "node-2")
        self.assertIsNone((yield self.store.claim(DEV, "node-1", 1)))
        self.assertEqual((yield self.store.where(DEV)), Owner("node-1", 1))
        self.assertIsNone((yield self.store.claim(DEV, "node-1", 1)), "the same session again is no other")
        self.assertEqual((yield self.store.claim(DEV, "node-2", 7)), Owner("node-1", 1))
        yield self.store.release(DEV, "node-1", 1)
        self.assertEqual((yield self.store.where(DEV)), Owner("node-2", 7), "a stale node does not release")
        yield self.store.release(DEV, "node-2", 6)
        self.assertEqual((yield self.store.where(DEV)), Owner("node-2", 7), "nor a stale session of the node")
        yield self.store.release(DEV, "node-2", 7)
        self.assertIsNone((yield self.store.where(DEV)))

    @defer.inlineCallbacks
    def test_release_all(self):
        """A draining node forgets all its devices in one call; another node's stay."""
        yield self.alive("node-1", "node-2")
        ids = [f"{i:032x}" for i in range(1, 6)]
        for d in ids[:4]:
            yield self.store.claim(d, "node-1", 1)
        yield self.store.claim(ids[4], "node-2", 2)
        yield self.store.claim(ids[3], "node-2", 3)  # moved on since
        self.assertEqual((yield self.store.release_all("node-1", ids)), 3)
        where = yield defer.gatherResults([self.store.where(d) for d in ids])
        self.assertEqual(where, [None, None, None, Owner("node-2", 3), Owner("node-2", 2)])


class DurableStoreContract:
    @defer.inlineCallbacks
    def test_survives_reopen(self):
        m1, m2, m3 = msg(b"1"), msg(b"2", collapse_id="c"), msg(b"3")
        yield self.put(m1, m2, m3)
        yield self.store.ack(DEV, m1.message_id)
        yield self.store.invalidate(b"\x05" * 32, NOW)
        self.store = yield self.reopen(self.store)
        got = yield self.pending()
        self.assertEqual(got, [m2, m3])
        self.assertEqual((yield self.store.invalidated(b"\x05" * 32)), NOW)
        # Order continues after a reopen, and collapse still finds the old message.
        yield self.put(msg(b"4"), msg(b"2'", collapse_id="c"))
        got = yield self.pending()
        self.assertEqual([m.payload for m in got], [b"3", b"4", b"2'"])
