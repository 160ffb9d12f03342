"""
The in-process store: bounded queues in memory. Loses everything when the process ends; for
tests and throwaway gateways. The durable providers implement the same interfaces. And
the in-process node bus (LocalBus) of the one-node stores.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid

from twisted.internet import defer
from zope.interface import implementer

from pushd.store.interfaces import (
    Enqueued,
    IMessageStore,
    INodeBus,
    IPresence,
    ITokenRegistry,
    Owner,
    topic_scoped_id,
)


@implementer(IMessageStore, ITokenRegistry, IPresence)
class MemoryStore:
    def __init__(self, per_topic: int = 1000):
        self.per_topic = per_topic
        self.dropped = 0
        self._seq = itertools.count()
        self._devices: dict = {}  # device -> {message_id: (seq, message)}
        self._invalid: dict = {}
        self._presence: dict = {}

    # --- messages ---------------------------------------------------------------

    def enqueue(self, m):
        since = self._invalid.get(m.token)
        if since is not None:
            return defer.succeed(Enqueued(invalidated=since))
        q = self._devices.setdefault(m.device_id, {})
        # Replace by id only within the topic (IMessageStore.enqueue).
        mid, scoped = m.message_id, topic_scoped_id(m.message_id, m.topic_hash)
        for key in (mid, scoped):
            held = q.get(key)
            if held is not None and held[1].topic_hash == m.topic_hash:
                del q[key]
        if mid in q:
            m = dataclasses.replace(m, message_id=scoped if scoped not in q else uuid.uuid4().bytes)
        if m.collapse_id is not None:
            for mid, (_, old) in list(q.items()):
                if old.topic_hash == m.topic_hash and old.collapse_id == m.collapse_id:
                    del q[mid]
        q[m.message_id] = (next(self._seq), m)
        same = [mid for mid, (_, old) in q.items() if old.topic_hash == m.topic_hash]
        for mid in same[: max(0, len(same) - self.per_topic)]:
            del q[mid]
            self.dropped += 1
        # One node: no owner to name, the router wakes its own session.
        return defer.succeed(Enqueued())

    def pending(self, device_id, topic_hashes, limit, now):
        q = self._devices.get(device_id, {})
        live = sorted(
            (seq, m)
            for seq, m in q.values()
            if m.topic_hash in topic_hashes and (m.expiry == 0 or m.expiry >= now)
        )
        return defer.succeed([m for _, m in live[:limit]])

    def ack(self, device_id, message_id):
        q = self._devices.get(device_id)
        found = q is not None and q.pop(message_id, None) is not None
        if q is not None and not q:
            del self._devices[device_id]
        return defer.succeed(found)

    def ack_many(self, device_id, message_ids):
        q = self._devices.get(device_id)
        n = 0
        if q is not None:
            for mid in message_ids:
                n += q.pop(mid, None) is not None
            if not q:
                del self._devices[device_id]
        return defer.succeed(n)

    def expire(self, now):
        n = 0
        for device_id in list(self._devices):
            q = self._devices[device_id]
            for mid in [mid for mid, (_, m) in q.items() if m.expiry and m.expiry < now]:
                del q[mid]
                n += 1
            if not q:
                del self._devices[device_id]
        return defer.succeed(n)

    def counters(self):
        pending = sum(len(q) for q in self._devices.values())
        return defer.succeed({"pending": pending, "dropped": self.dropped})

    def close(self):
        return defer.succeed(None)

    # --- tokens -------------------------------------------------------------------

    def invalidate(self, token, when):
        self._invalid[token] = when
        return defer.succeed(None)

    def invalidated(self, token):
        return defer.succeed(self._invalid.get(token))

    def revalidate(self, token):
        self._invalid.pop(token, None)
        return defer.succeed(None)

    # --- presence ----------------------------------------------------------------

    def claim(self, device_id, node, epoch):
        # One process: every node named is alive (they are tests' nodes sharing this store).
        before = self._presence.get(device_id)
        now = self._presence[device_id] = Owner(node, epoch)
        return defer.succeed(before if before != now else None)

    def release(self, device_id, node, epoch):
        if self._presence.get(device_id) == Owner(node, epoch):
            del self._presence[device_id]
        return defer.succeed(None)

    def release_all(self, node, device_ids=()):
        mine = [d for d, o in self._presence.items() if o.node == node]
        for d in mine:
            del self._presence[d]
        return defer.succeed(len(mine))

    def where(self, device_id):
        return defer.succeed(self._presence.get(device_id))


class LocalHub:
    """The medium of LocalBus handles: nodes in one process (one-node stores, tests)."""

    def __init__(self, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.listeners: dict = {}  # node -> (received, connected)
        self.beats: dict = {}  # node -> alive until


@implementer(INodeBus)
class LocalBus:
    """
    INodeBus in one process: the bus of the memory and SQLite stores, which serve one node
    (nothing is ever published on it but the node's own probes), and of tests that run
    several nodes in one process. Delivery is on a later reactor turn, as over a network.
    """

    shared = False

    def __init__(self, hub: LocalHub | None = None, clock=None):
        self.hub = hub if hub is not None else LocalHub(clock)
        self.node = None

    def listen(self, node, received, connected):
        if self.node is not None:
            raise RuntimeError("this bus listens already")
        self.node = node
        entry = self.hub.listeners[node] = (received, connected)
        self.hub.clock.callLater(0, lambda: self.hub.listeners.get(node) is entry and connected())

    def publish(self, node, data):
        entry = self.hub.listeners.get(node)
        if entry is None:
            return defer.succeed(0)
        self.hub.clock.callLater(0, lambda: self.hub.listeners.get(node) is entry and entry[0](data))
        return defer.succeed(1)

    def beat(self, node, ttl):
        now = self.hub.clock.seconds()
        was = self.hub.beats.get(node, now) > now
        self.hub.beats[node] = now + ttl
        return defer.succeed(was)

    def reconnect(self):
        node, entry = self.node, self.hub.listeners.get(self.node)
        if entry is not None:
            self.hub.clock.callLater(0, lambda: self.hub.listeners.get(node) is entry and entry[1]())

    def close(self):
        if self.node is not None:
            self.hub.listeners.pop(self.node, None)
            self.node = None
        return defer.succeed(None)
